"""Loading `module:attribute` plug-ins (reward functions, tools) with errors that name the option to fix."""

from __future__ import annotations

import importlib
from typing import Any


def import_attribute(
    spec: str, *, kind: str, builtins: str, flag: str, error: type[Exception], form: str = "module:attribute"
) -> Any:
    """The object `spec` = `module:attribute` names; `error(...)` says what is wrong and which flag to fix."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{kind} {spec!r}: use a built-in name ({builtins}) or {form}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise error(f"{kind} {spec!r} cannot be loaded ({exc}); check {flag}") from exc
