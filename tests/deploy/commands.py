"""Parse the command lines written in the deployment files into the components' real configs.

A container's command (`opd teacher ...`, `opd rollout ...`, `opd train ...`, or
`torchrun ... -m student_trainer ...`) and its environment go through the same
`load_config` / argparse path the process would take, so a misspelt flag, a
wrong env variable value or a preset that does not load fails here. Nothing is
started. Container paths of preset files are mapped back to the repository
(`/etc/opd/presets/X.yaml` -> `deploy/presets/X.yaml`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from opd.cli import COMMANDS
from opd.config import load_config

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "deploy" / "presets"
# Where the image and the deployments put repository files (Dockerfile COPY, compose mounts, ConfigMaps).
CONTAINER_DIRS = {"/etc/opd/presets": PRESETS, "/opt/opd/data": REPO / "deploy" / "data"}

# opd subcommand -> (config module, config class, env prefix); the same as each component's __main__.
COMPONENTS: dict[str, tuple[str, str, str]] = {
    "teacher": ("teacher_server.config", "TeacherConfig", "OPD_TEACHER__"),
    "rollout": ("rollout_workers.config", "RolloutConfig", "OPD_ROLLOUT__"),
    "train": ("student_trainer.config", "TrainerConfig", "OPD_TRAIN__"),
}


@dataclass
class ParsedCommand:
    component: str  # teacher | rollout | train
    config: Any  # TeacherConfig | RolloutConfig | TrainerConfig
    argv: list[str]  # the component's own arguments
    torchrun: Any = None  # argparse.Namespace of torchrun's options, when launched by torchrun


def host_path(container_path: str) -> Path:
    """The repository file that a container path of the image/deployments holds."""
    for prefix, directory in CONTAINER_DIRS.items():
        if container_path == prefix or container_path.startswith(prefix + "/"):
            return directory / container_path[len(prefix) :].lstrip("/")
    raise AssertionError(
        f"{container_path!r} is not a path the deployments fill from the repository (known: {sorted(CONTAINER_DIRS)})"
    )


def _map_config_flag(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, str(host_path(args[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            out.append("--config=" + str(host_path(arg.split("=", 1)[1])))
        else:
            out.append(arg)
        i += 1
    return out


def parse_opd(argv: Sequence[str], environ: Mapping[str, str]) -> ParsedCommand:
    """`[subcommand, *options]` as the `opd` entrypoint receives them -> the component's config."""
    assert argv, "empty opd command"
    name, rest = argv[0], list(argv[1:])
    assert name in COMMANDS, f"`opd {name}` is not an opd subcommand (known: {sorted(COMMANDS)})"
    assert name in COMPONENTS, f"`opd {name}` is not a long-running component a deployment should run"
    if name == "rollout":
        from rollout_workers.__main__ import normalize_argv

        rest = normalize_argv(rest)
    return _load(name, rest, environ)


def _load(component: str, argv: list[str], environ: Mapping[str, str]) -> ParsedCommand:
    module, cls_name, prefix = COMPONENTS[component]
    config_cls = getattr(importlib.import_module(module), cls_name)
    config = load_config(
        config_cls,
        _map_config_flag(argv),
        prog=f"opd {component}",
        description="",
        env_prefix=prefix,
        environ=dict(environ),
    )
    return ParsedCommand(component, config, list(argv))


def parse_torchrun(argv: Sequence[str], environ: Mapping[str, str]) -> ParsedCommand:
    """torchrun's own options (its real parser) and `-m student_trainer ARGS` as the trainer parses ARGS."""
    from torch.distributed.run import get_args_parser

    options = get_args_parser().parse_args(list(argv))
    assert options.module, "torchrun must launch the trainer as a module: -m student_trainer"
    assert options.training_script == "student_trainer", (
        f"torchrun launches {options.training_script!r}, not student_trainer"
    )
    parsed = _load("train", list(options.training_script_args), environ)
    parsed.torchrun = options
    return parsed


def parse_container(entrypoint: Sequence[str], args: Sequence[str], environ: Mapping[str, str]) -> ParsedCommand:
    """An opd-image container: `entrypoint` is the image's (`opd`) unless overridden (`torchrun`)."""
    program = Path(entrypoint[0]).name if entrypoint else "opd"
    full = [*entrypoint[1:], *args]
    if program == "opd":
        return parse_opd(full, environ)
    if program == "torchrun":
        return parse_torchrun(full, environ)
    raise AssertionError(f"unexpected program {entrypoint[0]!r} in an opd container (opd or torchrun)")


def split_host_port(address: str) -> tuple[str, int]:
    """`dns:///name:port`, `dns://authority/name:port` or `host:port` -> (host, port)."""
    target = address
    if address.startswith("dns:"):
        target = address.split("/", 3)[-1] if address.startswith("dns://") else address[len("dns:") :]
    host, _, port = target.rpartition(":")
    assert host and port.isdigit(), f"teacher address {address!r} is not host:port"
    return host, int(port)


def redis_endpoint(url: str) -> tuple[str, int, str | None]:
    """(host, port, password) of a redis:// URL."""
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss"), f"{url!r}: expected a redis:// URL over the network"
    return parts.hostname or "", parts.port or 6379, parts.password
