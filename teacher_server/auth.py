"""Who is calling the teacher: bearer tokens and mutual-TLS certificates map to client names.

The client name labels the metrics and is the unit of the fair share. Tokens
come from a YAML file (`name: token`, or `name: {token: ..., weight: ...,
max_queued_tokens: ..., max_queued_requests: ...}` with the team's weight and
queue caps; re-read when it changes) and/or
an environment variable (`name:token,name:token`); under mutual TLS,
`auth.cert_clients` maps a client certificate's subject CN or SAN to a name.
With both, a call needs both and they must name the same client. With
neither, auth is off and the name is the `x-opd-client` metadata value (or
`anonymous`). Token comparison is constant-time (`opd.auth.TokenTable`);
tokens never reach a log line or an error message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opd.auth import (
    NAME_RE,
    AuthError,
    TeamPolicy,
    TokenTable,
    parse_tokens_env,
    parse_tokens_file,
    presented_token,
)
from teacher_server.config import AuthConfig
from teacher_server.errors import Unauthenticated

Headers = Iterable[tuple[str, str | bytes]]
AuthContext = Mapping[str, Iterable[bytes]]
_CERT_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def load_tokens(config: AuthConfig) -> dict[str, str]:
    """token -> client name, from the configured file and env variable (empty: token auth off)."""
    tokens = parse_tokens_file(config.tokens_file) if config.tokens_file else {}
    if config.tokens_env:
        tokens.update(parse_tokens_env(config.tokens_env))
    return tokens


class Authenticator:
    """Identifies gRPC calls (metadata + the TLS peer) and HTTP requests (headers) of the teacher."""

    def __init__(self, config: AuthConfig) -> None:
        env_tokens = parse_tokens_env(config.tokens_env) if config.tokens_env else {}
        self._tokens = TokenTable(config.tokens_file, env_tokens)  # a bad file is a ConfigError here, at start-up
        self._cert_clients = dict(config.cert_clients)

    @property
    def enabled(self) -> bool:
        return self._tokens.enabled or bool(self._cert_clients)

    def policy(self, client: str) -> TeamPolicy:
        """The client's weight and queue caps from the tokens file (as last read; defaults when it names none)."""
        return self._tokens.policy(client)

    def _certificate_client(self, auth_context: AuthContext | None) -> str | None:
        """The client named by the peer's verified certificate; None when no certificate mapping is configured."""
        if not self._cert_clients:
            return None
        if auth_context is None:  # HTTP: no certificate; a valid token (checked next) is enough
            if self._tokens.enabled:
                return None
            raise Unauthenticated(
                "this teacher identifies clients by certificate (auth.cert_clients), which an HTTP request does "
                "not carry: use gRPC, or also configure auth.tokens_file and send a bearer token"
            )
        subjects = [v.decode(errors="replace") for key in _CERT_KEYS for v in auth_context.get(key, ())]
        for subject in subjects:
            if subject in self._cert_clients:
                return self._cert_clients[subject]
        shown = ", ".join(subjects) or "no client certificate"
        raise Unauthenticated(f"client certificate ({shown}) is not listed in the teacher's auth.cert_clients")

    def _token_client(self, headers: Headers) -> str | None:
        if not self._tokens.enabled:
            return None
        token = presented_token(headers)
        if token is None:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        name = self._tokens.lookup(token)
        if name is None:
            raise Unauthenticated("unknown bearer token")
        return name

    def identify(self, metadata: Headers, auth_context: AuthContext | None = None) -> str:
        """Client name for a call's metadata (gRPC) or headers (HTTP); raises Unauthenticated.

        `auth_context`: the gRPC call's `context.auth_context()` (None for HTTP, which has no client certificate).
        """
        metadata = list(metadata)
        by_cert = self._certificate_client(auth_context) if self._cert_clients else None
        by_token = self._token_client(metadata)
        if by_cert and by_token and by_cert != by_token:
            raise Unauthenticated(
                f"the client certificate names client {by_cert!r} but the bearer token names {by_token!r}"
            )
        if by_cert or by_token:
            return by_cert or by_token  # type: ignore[return-value]
        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in metadata}
        name = headers.get("x-opd-client", "anonymous")
        return name if NAME_RE.match(name) else "anonymous"

    def check(self, headers: Headers) -> str:
        """The ops port's check (`opd.ops_app.OpsAuth`): every non-probe HTTP route needs a valid token."""
        try:
            return self.identify(headers)
        except Unauthenticated as exc:
            raise AuthError(str(exc)) from None
