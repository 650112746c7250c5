"""Load the docker-compose files the way Compose does, without Docker: interpolation, merging, profiles.

Variables come from `deploy/compose/.env.example` (what a user copies to
`.env`), with Compose's syntax: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`.
Override files merge into the base as `docker compose -f a -f b` does for the
keys these files use (mappings merge, scalars and sequences are replaced).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.commands import REPO

COMPOSE_DIR = REPO / "deploy" / "compose"
BASE_FILE = COMPOSE_DIR / "docker-compose.yml"
TWO_STUDENTS_FILE = COMPOSE_DIR / "docker-compose.two-students.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^}]*)\})")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class InterpolationError(ValueError):
    pass


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        inner = _BRACED.match(match["braced"])
        if inner is None:
            raise InterpolationError(f"invalid interpolation ${{{match['braced']}}}")
        name, op, arg = inner["name"], inner["op"], inner["arg"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is None:
            return value or ""
        if op.endswith("-"):
            return interpolate(arg, env) if unset_or_empty else value
        if op.endswith("?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return value
        return interpolate(arg, env) if not unset_or_empty else ""  # + : alternative value

    return _VAR.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_raw(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def load(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One compose file, interpolated (raises InterpolationError like Compose for a missing required variable)."""
    return _interpolate_tree(load_raw(path), read_env_file() if env is None else env)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def project(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`docker compose -f paths[0] -f paths[1] ...` as one merged model."""
    model: dict[str, Any] = {}
    for path in paths:
        model = merge(model, load(path, env))
    return model


def services_in_profile(model: Mapping[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """Services Compose starts with `--profile PROFILE` (services without profiles always start)."""
    return {
        name: svc for name, svc in model["services"].items() if not svc.get("profiles") or profile in svc["profiles"]
    }


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def aliases(name: str, service: Mapping[str, Any]) -> set[str]:
    """Names that resolve to this service on the default network."""
    names = {name}
    networks = service.get("networks") or {}
    if isinstance(networks, dict):
        for net in networks.values():
            names.update((net or {}).get("aliases") or [])
    return names


def as_list(command: Any) -> list[str]:
    if command is None:
        return []
    assert isinstance(command, list), f"use the exec (list) form for commands, got {command!r}"
    return [str(c) for c in command]


def volume_mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume of a service."""
    mounts = []
    for spec in service.get("volumes") or []:
        assert isinstance(spec, str), f"use the short volume syntax: {spec!r}"
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"volume {spec!r}: expected SOURCE:TARGET[:ro]"
        mounts.append((parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    return mounts


def mount_for(service: Mapping[str, Any], path: str) -> tuple[str, str, bool] | None:
    """The volume whose target holds `path` (the deepest one)."""
    best = None
    for source, target, read_only in volume_mounts(service):
        holds = path == target or path.startswith(target.rstrip("/") + "/")
        if holds and (best is None or len(target) > len(best[1])):
            best = (source, target, read_only)
    return best


def secret_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> Compose secret name, for the service's `secrets:` (short form: /run/secrets/NAME)."""
    out = {}
    for item in service.get("secrets") or []:
        if isinstance(item, str):
            out[f"/run/secrets/{item}"] = item
        else:
            target = item.get("target", item["source"])
            out[target if target.startswith("/") else f"/run/secrets/{target}"] = item["source"]
    return out


def secret_source(model: Mapping[str, Any], service: Mapping[str, Any], path: str) -> str | None:
    """The file (relative to deploy/compose) behind the secret mounted at `path`, or None."""
    name = secret_mounts(service).get(path)
    return None if name is None else model["secrets"][name]["file"]
