"""Typed configuration loading shared by every component.

Owns the precedence rule YAML preset < environment < CLI flags for any
pydantic config class: one CLI flag per leaf field (nested sub-configs are
flattened with dashes, `grpc.port` -> `--grpc-port`), one environment variable
per leaf (`OPD_TEACHER__GRPC__PORT`), and a YAML preset given by `--config`.
Every field's description and default show in `--help`.

Does not own any component's fields: each component declares its own config
class (subclassing `ConfigModel`) and calls `load_config`.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message says which and how to fix it."""


class ConfigModel(BaseModel):
    """Base for every config class: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Path_ = tuple[str, ...]


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_submodel(annotation: Any) -> bool:
    ann = _unwrap_optional(annotation)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def iter_leaf_fields(model_cls: type[BaseModel], prefix: Path_ = ()) -> Iterator[tuple[Path_, FieldInfo]]:
    """Yield (path, field) for every non-model field, depth first, in declaration order."""
    for name, field in model_cls.model_fields.items():
        path = (*prefix, name)
        if _is_submodel(field.annotation):
            yield from iter_leaf_fields(_unwrap_optional(field.annotation), path)
        else:
            yield path, field


def flag_name(path: Path_) -> str:
    return "--" + "-".join(p.replace("_", "-") for p in path)


def env_name(env_prefix: str, path: Path_) -> str:
    return env_prefix + "__".join(p.upper() for p in path)


def _describe_default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            return repr(field.default_factory())
        except TypeError:
            return "computed"
    return "required" if field.is_required() else repr(field.default)


def _add_flag(parser: argparse.ArgumentParser, path: Path_, field: FieldInfo, env_prefix: str) -> None:
    ann = _unwrap_optional(field.annotation)
    origin = typing.get_origin(ann)
    help_text = f"{field.description or ''} (default: {_describe_default(field)}; env {env_name(env_prefix, path)})"
    kwargs: dict[str, Any] = {"dest": "__".join(path), "default": argparse.SUPPRESS, "help": help_text}
    if ann is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(ann)
        kwargs["choices"] = choices
        kwargs["type"] = type(choices[0])
    elif origin in (list, tuple, Sequence):
        (item,) = typing.get_args(ann)[:1] or (str,)
        kwargs["nargs"] = "*"
        kwargs["type"] = item if item in (int, float, str) else str
    elif ann in (int, float, str):
        kwargs["type"] = ann
        kwargs["metavar"] = ann.__name__.upper()
    elif ann is Path:
        kwargs["type"] = str
        kwargs["metavar"] = "PATH"
    else:  # dicts and other structured values: YAML on the command line
        kwargs["type"] = yaml.safe_load
        kwargs["metavar"] = "YAML"
    parser.add_argument(flag_name(path), **kwargs)


def build_parser(model_cls: type[BaseModel], *, prog: str, description: str, env_prefix: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML preset; environment variables override it and flags override both")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit")
    for path, field in iter_leaf_fields(model_cls):
        _add_flag(parser, path, field, env_prefix)
    return parser


def _set_path(tree: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(path[:-1])} must be a mapping, got {node!r}")
        tree = node
    tree[path[-1]] = value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins on leaves."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_preset(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML preset to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def read_env(model_cls: type[BaseModel], env_prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Values of `{env_prefix}{A}__{B}` variables for leaf fields; non-string fields are parsed as YAML scalars."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    for path, field in iter_leaf_fields(model_cls):
        raw = environ.get(env_name(env_prefix, path))
        if raw is None:
            continue
        ann = _unwrap_optional(field.annotation)
        is_text = ann is str or ann is Path or (typing.get_origin(ann) is Literal and isinstance(typing.get_args(ann)[0], str))
        _set_path(tree, path, raw if is_text else yaml.safe_load(raw))
    return tree


def format_validation_error(exc: ValidationError, env_prefix: str) -> str:
    lines = []
    for err in exc.errors():
        path = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        where = f"{'.'.join(path)} (flag {flag_name(path)}, env {env_name(env_prefix, path)})" if path else "config"
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def validate_config(model_cls: type[BaseModel], data: Mapping[str, Any], env_prefix: str = "OPD_") -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, env_prefix)) from None


def load_config(model_cls: type[BaseModel], argv: Sequence[str] | None, *, prog: str, description: str,
                env_prefix: str, environ: Mapping[str, str] | None = None) -> Any:
    """Parse argv (and the environment, and a YAML preset) into an instance of `model_cls`.

    Raises ConfigError with a message that names the flag / env variable to fix.
    `--help` and `--print-config` exit the process (argparse convention).
    """
    parser = build_parser(model_cls, prog=prog, description=description, env_prefix=env_prefix)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    data: dict[str, Any] = read_yaml_preset(args.config) if args.config else {}
    data = deep_merge(data, read_env(model_cls, env_prefix, environ))
    cli_tree: dict[str, Any] = {}
    for dest, value in flags.items():
        _set_path(cli_tree, tuple(dest.split("__")), value)
    config = validate_config(model_cls, deep_merge(data, cli_tree), env_prefix)
    if args.print_config:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        raise SystemExit(0)
    return config
