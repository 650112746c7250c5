"""Bearer-token authentication: tokens map to client names (which label metrics and fair share).

Tokens come from a YAML file (`name: token` mapping) and/or an environment
variable (`name:token,name:token`). With no tokens configured, auth is off
and the client name is the `x-opd-client` metadata value (or `anonymous`).
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable

import yaml

from opd.config import ConfigError
from teacher_server.config import AuthConfig
from teacher_server.errors import Unauthenticated

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_name(name: str, source: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(f"{source}: client name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
    return name


def load_tokens(config: AuthConfig) -> dict[str, str]:
    """token -> client name, from the configured file and env variable (empty: auth off)."""
    tokens: dict[str, str] = {}
    if config.tokens_file:
        try:
            data = yaml.safe_load(open(config.tokens_file).read()) or {}  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"auth.tokens_file {config.tokens_file!r} cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"auth.tokens_file {config.tokens_file!r} must be a YAML mapping of name: token")
        for name, token in data.items():
            tokens[str(token)] = _check_name(str(name), "auth.tokens_file")
    if config.tokens_env:
        raw = os.environ.get(config.tokens_env, "")
        for pair in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, token = pair.partition(":")
            if not sep or not token:
                raise ConfigError(f"env {config.tokens_env}: expected name:token pairs, got {pair!r}")
            tokens[token] = _check_name(name, f"env {config.tokens_env}")
    return tokens


class Authenticator:
    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Client name for the call's metadata (gRPC) or headers (HTTP); raises Unauthenticated."""
        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in metadata}
        if not self._tokens:
            name = headers.get("x-opd-client", "anonymous")
            return name if _NAME_RE.match(name) else "anonymous"
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        for known, name in self._tokens.items():
            if hmac.compare_digest(known, token.strip()):
                return name
        raise Unauthenticated("unknown bearer token")
