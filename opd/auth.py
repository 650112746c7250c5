"""Bearer tokens shared by every server: the token table, its reload, and the HTTP check.

Owns the tokens-file format (a YAML mapping; each entry either `client_name: token`
or `client_name: {token: ..., weight: 2, max_queued_tokens: ..., max_queued_requests: ...}`,
the team's share of the teacher and its queue caps, `TeamPolicy`), reading it
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
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd.config import ConfigError

log = logging.getLogger(__name__)
POLICY_CHECK_S = 0.25  # how often a team-policy read looks at the tokens file's stat
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AuthError(Exception):
    """A request without a valid token; the message says what is missing, never the token."""


def check_name(name: str, source: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: client name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True)
class TeamPolicy:
    """What the tokens file says about one team (client name) besides its token; defaults for other clients."""

    weight: float = 1.0  # relative share of the teacher's scored tokens when several teams are backlogged
    max_queued_tokens: int | None = None  # beyond it the team's requests get RESOURCE_EXHAUSTED (None: no cap)
    max_queued_requests: int | None = None


DEFAULT_POLICY = TeamPolicy()
_POLICY_KEYS = {"token", "weight", "max_queued_tokens", "max_queued_requests"}
_FORM = "`name: token` or `name: {token: ..., weight: 2, max_queued_tokens: 100000}`"


@dataclass(frozen=True)
class TokensFile:
    """A parsed tokens file: token -> client name, and the policy of every team that sets one."""

    tokens: dict[str, str] = field(default_factory=dict)
    policies: dict[str, TeamPolicy] = field(default_factory=dict)


def _entry_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of each top-level key, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def _positive(value: object, key: str, where: str, *, integer: bool) -> float | int:
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a whole number >= 1" if integer else "a number > 0"
        raise ConfigError(f"{where}: {key} must be {what} (got {value!r})")
    return value


def _policy_entry(name: str, value: object, where: str) -> tuple[str, TeamPolicy | None]:
    """(token, policy or None for the plain form) of one entry; ConfigError naming the team and the fix."""
    if isinstance(value, str | int) and not isinstance(value, bool):
        if not str(value):
            raise ConfigError(f"{where}: the token of client {name!r} must be a non-empty string")
        return str(value), None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: the entry of client {name!r} must be {_FORM}")
    unknown = sorted(map(str, set(value) - _POLICY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: client {name!r} has unknown key(s) {unknown}; allowed: {sorted(_POLICY_KEYS)}")
    token = value.get("token")
    if isinstance(token, bool) or not isinstance(token, str | int) or not str(token):
        raise ConfigError(f"{where}: client {name!r} needs `token:` with a non-empty string")
    policy = TeamPolicy(
        weight=float(_positive(value.get("weight", 1.0), "weight", where, integer=False)),
        max_queued_tokens=_optional_cap(value, "max_queued_tokens", where),
        max_queued_requests=_optional_cap(value, "max_queued_requests", where),
    )
    return str(token), policy


def _optional_cap(value: dict, key: str, where: str) -> int | None:
    return None if value.get(key) is None else int(_positive(value[key], key, where, integer=True))


def read_tokens_file(path: str) -> TokensFile:
    """Tokens and team policies from the tokens file; ConfigError (never showing a token) if malformed."""
    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"tokens file {path!r} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"tokens file {path!r} is not valid YAML{at}; write one {_FORM} per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tokens file {path!r} must be a YAML mapping of {_FORM}")
    lines = _entry_lines(text)
    out = TokensFile()
    for name, value in data.items():
        line = lines.get(str(name))
        where = f"tokens file {path!r}" + (f", line {line}" if line else "")
        token, policy = _policy_entry(str(name), value, where)
        out.tokens[token] = check_name(str(name), where)
        if policy is not None:
            out.policies[str(name)] = policy
    return out


def parse_tokens_file(path: str) -> dict[str, str]:
    """token -> client name from the tokens file (either entry form); ConfigError (without the tokens) if malformed."""
    return read_tokens_file(path).tokens


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
        parsed = read_tokens_file(tokens_file) if tokens_file else TokensFile()
        self._entries, self._policies = self._build(parsed.tokens), parsed.policies
        self._policy_checked = time.monotonic()

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
            parsed = read_tokens_file(self._file)
        except ConfigError as exc:
            log.warning("%s; keeping the previous tokens and team settings until the file changes again", exc)
            return False
        self._entries, self._policies = self._build(parsed.tokens), parsed.policies
        weights = ", ".join(f"{n} {p.weight:g}" for n, p in sorted(parsed.policies.items())) or "all 1"
        log.info("tokens file %s reloaded: %d client token(s); weights: %s", self._file, len(self._entries), weights)
        return True

    def policy(self, name: str) -> TeamPolicy:
        """The team's weight and caps as the file says (defaults for a client it gives none).

        Checks the file for changes at most every `POLICY_CHECK_S`: the scheduler asks at every dispatch, and
        a long-lived stream's requests never pass `lookup` again."""
        now = time.monotonic()
        if now - self._policy_checked >= POLICY_CHECK_S:
            self._policy_checked = now
            self.reload_if_changed()
        return self._policies.get(name, DEFAULT_POLICY)

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
