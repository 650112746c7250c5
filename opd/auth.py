"""Bearer tokens shared by every server: the token table, its reload, and the HTTP check.

Owns the tokens-file format (a YAML mapping `client_name: token`), reading it
again when it changes on disk (checked on use, by its stat, so a rotated
Kubernetes Secret is picked up without a restart), the constant-time lookup
of a presented token, and reading `Authorization: Bearer <token>` (or HTTP
Basic with the token as password, which browsers send for the trainer's live
page). The teacher's client identity (tokens plus mTLS certificates) is
`teacher_server.auth`; this module knows nothing about gRPC.

Tokens are never logged and never part of an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from opd.config import ConfigError

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AuthError(Exception):
    """A request without a valid token; the message says what is missing, never the token."""


def check_name(name: str, source: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: client name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
    return name


def parse_tokens_file(path: str) -> dict[str, str]:
    """token -> client name from a YAML mapping `name: token`; ConfigError (without the tokens) if malformed."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"tokens file {path!r} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise ConfigError(f"tokens file {path!r} is not valid YAML; write one `client_name: token` per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tokens file {path!r} must be a YAML mapping of client_name: token")
    tokens: dict[str, str] = {}
    for name, token in data.items():
        if not isinstance(token, str | int) or not str(token):
            raise ConfigError(f"tokens file {path!r}: the token of client {name!r} must be a non-empty string")
        tokens[str(token)] = check_name(str(name), f"tokens file {path!r}")
    return tokens


def parse_tokens_env(variable: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """token -> client name from an env variable holding `name:token,name:token`."""
    raw = (os.environ if environ is None else environ).get(variable, "")
    tokens: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, token = pair.partition(":")
        if not sep or not token:
            raise ConfigError(f"env {variable}: expected name:token pairs, got an entry for {name!r} without a token")
        tokens[token] = check_name(name, f"env {variable}")
    return tokens


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes Secret rotates by swapping a symlink
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenTable:
    """Known tokens -> client names, from a tokens file (reloaded when it changes) and fixed extra tokens.

    An unreadable or malformed file at start-up is a ConfigError; a bad file later (say, half written) is
    logged and the previous tokens stay in force until the file changes again.
    """

    def __init__(self, tokens_file: str | None = None, extra: Mapping[str, str] | None = None) -> None:
        self._file, self._extra = tokens_file, dict(extra or {})
        self._stamp = _stamp(tokens_file) if tokens_file else None
        self._entries = self._build(parse_tokens_file(tokens_file) if tokens_file else {})

    def _build(self, from_file: Mapping[str, str]) -> list[tuple[bytes, str]]:
        # Compare fixed-length digests: compare_digest is then constant-time in the token's length too.
        return [(_digest(token), name) for token, name in {**from_file, **self._extra}.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._file) or bool(self._extra)

    def reload_if_changed(self) -> bool:
        """Re-read the tokens file if its stat changed; True when new tokens took effect."""
        if not self._file:
            return False
        stamp = _stamp(self._file)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries = self._build(parse_tokens_file(self._file))
        except ConfigError as exc:
            log.warning("%s; keeping the previous tokens until the file changes again", exc)
            return False
        self._entries = entries
        log.info("tokens file %s reloaded: %d client token(s)", self._file, len(entries))
        return True

    def lookup(self, token: str) -> str | None:
        """The client name of `token`, or None. Every known token is compared, in constant time each."""
        self.reload_if_changed()
        presented, found = _digest(token), None
        for digest, name in self._entries:
            if hmac.compare_digest(digest, presented) and found is None:
                found = name
        return found

    def names(self) -> set[str]:
        return {name for _, name in self._entries}


def presented_token(headers: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of `authorization: Bearer <token>` (or Basic with the token as password); None if absent."""
    values = {k.lower(): (v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in headers}
    scheme, _, credentials = values.get("authorization", "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if scheme.lower() == "basic" and credentials:
        try:
            _user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


class BearerAuth:
    """The ops port's check: a request must present a token of `table` (any client)."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def check(self, headers: Iterable[tuple[str, str | bytes]]) -> str:
        """The client name for these HTTP headers; raises AuthError."""
        token = presented_token(headers)
        if token is None:
            raise AuthError("missing `Authorization: Bearer <token>` header")
        name = self.table.lookup(token)
        if name is None:
            raise AuthError("unknown bearer token")
        return name
