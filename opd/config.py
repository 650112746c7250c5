"""Typed configuration loading shared by every component.

Owns the precedence rule YAML preset < environment < CLI flags for any
pydantic config class: one CLI flag per leaf field (nested sub-configs are
flattened with dashes, `grpc.port` -> `--grpc-port`), one environment variable
per leaf (`OPD_TEACHER__GRPC__PORT`), and a YAML preset given by `--config`.
Every field's description and default show in `--help`.

Also owns renamed keys: a config class lists `renamed_keys` (old key -> new
dotted path), and the old spelling keeps working in every source (YAML key,
env variable, flag) with a `DeprecatedConfigKey` warning that names the new
one. Each source is renamed on its own before the merge, so precedence still
follows the source, not the spelling.

Secrets: a field marked `json_schema_extra=opd.redaction.SECRET` (or
`SECRET_URL` for a URL that may hold a password) is shown as `<redacted>` by
`--print-config` and in validation errors; the value itself is kept.

Does not own any component's fields: each component declares its own config
class (subclassing `ConfigModel`) and calls `load_config`; the sub-configs
several components share live next to what they configure
(`opd.ops_app.OpsConfig`, `opd.vllm_config.VllmConfig`, `opd.streams.RedisConfig`).
"""

from __future__ import annotations

import argparse
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from opd.redaction import REDACTED, redact_text, redacted_dump, secret_kind

Path_ = tuple[str, ...]

# A TCP port in a config; 0 = let the OS pick a free one.
Port = Annotated[int, Field(ge=0, le=65535)]


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message says which and how to fix it."""


class DeprecatedConfigKey(FutureWarning):
    """A renamed config key, env variable or flag was used; it still works, under its new name."""


class ConfigModel(BaseModel):
    """Base for every config class: unknown keys are errors, assignments are validated.

    `renamed_keys` maps a deprecated key of this class to its new dotted path inside this class
    (`{"kv_cache_gib": "vllm.kv_cache_gib"}`); the old key still loads, with a warning.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _rename_deprecated_keys(cls, data: Any) -> Any:
        # Loading goes through rename_deprecated_keys with full paths first; this catches configs built
        # in code (`RolloutConfig(engine={"kv_cache_gib": 2})`).
        if isinstance(data, Mapping) and cls.renamed_keys:
            return _rename_level(cls, dict(data), (), lambda p: f"{cls.__name__} key {'.'.join(p)!r}")
        return data


def _yaml_key(path: Path_) -> str:
    return f"config key {'.'.join(path)!r}"


def _rename_level(
    model_cls: type[ConfigModel], data: dict[str, Any], prefix: Path_, spell: Callable[[Path_], str]
) -> dict[str, Any]:
    """Move this level's deprecated keys of `data` to their new paths (copying the dicts on the way)."""
    for old, new in model_cls.renamed_keys.items():
        if old not in data:
            continue
        new_path = tuple(new.split("."))
        value = data.pop(old)
        node = data
        for key in new_path[:-1]:
            child = node.get(key, {})
            if not isinstance(child, Mapping):
                raise ConfigError(f"{spell((*prefix, *new_path[:-1]))} must be a mapping, got {child!r}")
            node[key] = node = dict(child)
        if new_path[-1] in node:
            raise ConfigError(
                f"{spell((*prefix, old))} is the deprecated name of {spell((*prefix, *new_path))} "
                f"and both are set; keep only {spell((*prefix, *new_path))}"
            )
        node[new_path[-1]] = value
        warnings.warn(
            f"{spell((*prefix, old))} is deprecated and will be removed; use {spell((*prefix, *new_path))}",
            DeprecatedConfigKey,
            stacklevel=2,
        )
    return data


def rename_deprecated_keys(
    model_cls: type[BaseModel], tree: Mapping[str, Any], spell: Callable[[Path_], str] = _yaml_key, prefix: Path_ = ()
) -> dict[str, Any]:
    """`tree` (one source: a preset, the env or the flags) with deprecated keys moved to their new paths.

    Warns once per renamed key, spelled as the user wrote it (`spell`: path -> YAML key, env name or flag).
    """
    data = dict(tree)
    if issubclass(model_cls, ConfigModel):
        data = _rename_level(model_cls, data, prefix, spell)
    for name, field in model_cls.model_fields.items():
        if _is_submodel(field.annotation) and isinstance(data.get(name), Mapping):
            data[name] = rename_deprecated_keys(_unwrap_optional(field.annotation), data[name], spell, (*prefix, name))
    return data


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


def iter_renamed_leaves(model_cls: type[BaseModel], prefix: Path_ = ()) -> Iterator[tuple[Path_, Path_, FieldInfo]]:
    """Yield (old path, new path, new field) for every deprecated key that names a leaf field."""
    for old, new in getattr(model_cls, "renamed_keys", {}).items():
        owner, parts = model_cls, new.split(".")
        for part in parts[:-1]:
            owner = _unwrap_optional(owner.model_fields[part].annotation)
        field = owner.model_fields[parts[-1]]
        if not _is_submodel(field.annotation):
            yield (*prefix, old), (*prefix, *parts), field
    for name, field in model_cls.model_fields.items():
        if _is_submodel(field.annotation):
            yield from iter_renamed_leaves(_unwrap_optional(field.annotation), (*prefix, name))


def flag_name(path: Path_) -> str:
    return "--" + "-".join(p.replace("_", "-") for p in path)


def env_name(env_prefix: str, path: Path_) -> str:
    return env_prefix + "__".join(p.upper() for p in path)


def _describe_default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            return repr(field.get_default(call_default_factory=True, validated_data={}))
        except TypeError:
            return "computed"
    return "required" if field.is_required() else repr(field.default)


def _add_flag(
    parser: argparse.ArgumentParser, path: Path_, field: FieldInfo, env_prefix: str, hidden: bool = False
) -> None:
    ann = _unwrap_optional(field.annotation)
    origin = typing.get_origin(ann)
    help_text = f"{field.description or ''} (default: {_describe_default(field)}; env {env_name(env_prefix, path)})"
    kwargs: dict[str, Any] = {
        "dest": "__".join(path),
        "default": argparse.SUPPRESS,
        "help": argparse.SUPPRESS if hidden else help_text,
    }
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


def build_parser(
    model_cls: type[BaseModel], *, prog: str, description: str, env_prefix: str
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML preset; environment variables override it and flags override both",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration as YAML and exit"
    )
    flags = set()
    for path, field in iter_leaf_fields(model_cls):
        _add_flag(parser, path, field, env_prefix)
        flags.add(flag_name(path))
    for old, _new, field in iter_renamed_leaves(model_cls):  # deprecated spellings: accepted, not listed
        if flag_name(old) not in flags:
            _add_flag(parser, old, field, env_prefix, hidden=True)
            flags.add(flag_name(old))
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


def _env_value(raw: str, field: FieldInfo) -> Any:
    ann = _unwrap_optional(field.annotation)
    is_text = (
        ann is str or ann is Path or (typing.get_origin(ann) is Literal and isinstance(typing.get_args(ann)[0], str))
    )
    return raw if is_text else yaml.safe_load(raw)


def read_env(model_cls: type[BaseModel], env_prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Values of `{env_prefix}{A}__{B}` variables for leaf fields; non-string fields are parsed as YAML scalars.

    Deprecated variable names are read too and moved to their new paths (with a warning).
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    for path, field in iter_leaf_fields(model_cls):
        raw = environ.get(env_name(env_prefix, path))
        if raw is not None:
            _set_path(tree, path, _env_value(raw, field))
    for old, new, field in iter_renamed_leaves(model_cls):
        raw = environ.get(env_name(env_prefix, old))
        if raw is not None and env_name(env_prefix, old) != env_name(env_prefix, new):
            _set_path(tree, old, _env_value(raw, field))
    return rename_deprecated_keys(model_cls, tree, lambda p: f"env {env_name(env_prefix, p)}")


def _is_secret_path(model_cls: type[BaseModel] | None, path: Path_) -> bool:
    """Whether `path` names a field marked secret (`opd.redaction.SECRET`) or lies inside one."""
    node: Any = model_cls
    for key in path:
        if typing.get_origin(_unwrap_optional(node)) is dict:  # a mapping of sub-configs: the key names an entry
            node = typing.get_args(_unwrap_optional(node))[1]
            continue
        ann = _unwrap_optional(node) if node is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) or key not in ann.model_fields:
            return False
        field = ann.model_fields[key]
        if secret_kind(field.json_schema_extra) is True:
            return True
        node = field.annotation
    return False


def format_validation_error(exc: ValidationError, env_prefix: str, model_cls: type[BaseModel] | None = None) -> str:
    """One line per error naming the key, flag and env variable; a secret's value is never shown."""
    lines = []
    for err in exc.errors():
        path = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        where = f"{'.'.join(path)} (flag {flag_name(path)}, env {env_name(env_prefix, path)})" if path else "config"
        got = REDACTED if _is_secret_path(model_cls, path) else redact_text(repr(err.get("input")))
        lines.append(f"  {where}: {redact_text(err['msg'])} (got {got})")
    return "invalid configuration:\n" + "\n".join(lines)


def validate_config(model_cls: type[BaseModel], data: Mapping[str, Any], env_prefix: str = "OPD_") -> Any:
    """`data` (a preset, or merged sources) as `model_cls`; deprecated keys are renamed with a warning."""
    data = rename_deprecated_keys(model_cls, data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, env_prefix, model_cls)) from None


def load_config(
    model_cls: type[BaseModel],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Parse argv (and the environment, and a YAML preset) into an instance of `model_cls`.

    Raises ConfigError with a message that names the flag / env variable to fix.
    `--help` and `--print-config` exit the process (argparse convention); `--print-config` shows secret
    fields as `<redacted>` and URLs without their passwords (`opd.redaction`).
    """
    parser = build_parser(model_cls, prog=prog, description=description, env_prefix=env_prefix)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    data: dict[str, Any] = {}
    if args.config:
        data = rename_deprecated_keys(
            model_cls, read_yaml_preset(args.config), lambda p: f"key {'.'.join(p)!r} of {args.config}"
        )
    data = deep_merge(data, read_env(model_cls, env_prefix, environ))
    cli_tree: dict[str, Any] = {}
    for dest, value in flags.items():
        _set_path(cli_tree, tuple(dest.split("__")), value)
    data = deep_merge(data, rename_deprecated_keys(model_cls, cli_tree, lambda p: f"flag {flag_name(p)}"))
    config = validate_config(model_cls, data, env_prefix)
    if args.print_config:
        print(yaml.safe_dump(redacted_dump(config), sort_keys=False))  # secrets stay in the process
        raise SystemExit(0)
    return config
