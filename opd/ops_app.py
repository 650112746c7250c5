"""The HTTP ops port every long-running process serves (FastAPI on uvicorn).

Owns the ops port's config (`OpsConfig`: each component subclasses it only to
set its own default port — teacher 9101, rollout 9102, trainer 9103), the
shared routes — `/metrics` (Prometheus text from the component's own
registry), `/healthz` (process alive), `/readyz` (component ready, 503 until
then) — and running uvicorn inside the component's asyncio loop on a given or
ephemeral port. Components add their own routes (`/v1/info`, `/status`, ...)
through an APIRouter; nothing component-specific lives here.

Also owns the port's protection: with auth on (`ops.tokens_file`, or the
component's own tokens), every route except the three probe routes needs a
bearer token; with `ops.tls_cert_file`/`ops.tls_key_file` it serves HTTPS,
re-reading a renewed certificate without a restart (`opd.tls`); and a port
open on all interfaces without auth is reported by one warning at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import Field, model_validator

from opd.auth import AuthError, BearerAuth, TokenTable
from opd.config import ConfigModel, Port
from opd.tls import CertFiles, ReloadingSSLContext, check_cert_options, listens_on_all_interfaces

log = logging.getLogger(__name__)

# Kubelet probes and Prometheus reach these without a token; they expose nothing secret.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class OpsConfig(ConfigModel):
    """The ops HTTP port of one process (`--ops-host`, `--ops-port`); components set the default port."""

    host: str = Field(default="0.0.0.0", description="ops HTTP bind address")
    port: Port = Field(default=0, description="ops HTTP port: /metrics /healthz /readyz (0 = pick a free one)")
    tokens_file: str | None = Field(
        default=None,
        description="YAML mapping `client_name: token`; when set, every ops route except /healthz /readyz "
        "/metrics needs `Authorization: Bearer <token>` (re-read when the file changes)",
    )
    tls_cert_file: str | None = Field(default=None, description="serve HTTPS with this PEM certificate (chain)")
    tls_key_file: str | None = Field(default=None, description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _check_tls(self) -> OpsConfig:
        check_cert_options(self.tls_cert_file, self.tls_key_file, "ops")
        return self

    def cert_files(self) -> CertFiles | None:
        if not self.tls_cert_file or not self.tls_key_file:
            return None
        return CertFiles(self.tls_cert_file, self.tls_key_file, option="ops")


class OpsAuth(Protocol):
    """What the ops port asks of an authenticator: the caller's name for these headers, or AuthError."""

    def check(self, headers: Iterable[tuple[str, str | bytes]]) -> str: ...


def ops_auth(config: OpsConfig) -> BearerAuth | None:
    """The bearer check of `config.tokens_file`; None when unset (the routes are open)."""
    return BearerAuth(TokenTable(config.tokens_file)) if config.tokens_file else None


class _RequireToken:
    """ASGI middleware: every HTTP path but OPEN_PATHS needs a token that `auth` accepts (401 otherwise)."""

    def __init__(self, app: Any, auth: OpsAuth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        try:
            self.auth.check(headers)
        except AuthError as exc:
            body = json.dumps({"error": {"code": "UNAUTHENTICATED", "message": str(exc)}}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b'Bearer realm="opd", Basic realm="opd"'),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return None
        return await self.app(scope, receive, send)


def create_ops_app(
    component: str,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    routers: list[APIRouter] | None = None,
    auth: OpsAuth | None = None,
) -> FastAPI:
    """Build the ops app of one component; `ready()` decides /readyz; `auth` guards all but the probe routes."""
    app = FastAPI(title=f"opd {component} ops", docs_url="/docs", redoc_url=None)
    app.state.opd_component, app.state.opd_auth = component, auth

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "component": component}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, str]:
        is_ready = ready()
        if not is_ready:
            response.status_code = 503
        return {"status": "ready" if is_ready else "not ready", "component": component}

    for router in routers or []:
        app.include_router(router)
    if auth is not None:
        app.add_middleware(_RequireToken, auth=auth)
    return app


def warn_if_open(component: str, listeners: Sequence[tuple[str, str, int, bool]]) -> bool:
    """One warning naming every (what, host, port, authenticated) listener open on all interfaces without auth."""
    open_ = [
        f"{what} {host or '*'}:{port}"
        for what, host, port, authed in listeners
        if listens_on_all_interfaces(host) and not authed
    ]
    if open_:
        log.warning(
            "%s listens on all interfaces with no authentication (%s): anyone who can reach this host can call "
            "it. Turn auth on (a tokens file; see --help) or bind to 127.0.0.1 / a private interface.",
            component,
            ", ".join(open_),
        )
    return bool(open_)


class OpsServer:
    """uvicorn serving an ops app inside the caller's event loop; `port=0` binds an ephemeral port.

    `tls`: serve HTTPS with these files (reloaded when they change). `warn_open`: warn at start when
    the port is on all interfaces and the app has no auth (a component that warns for several ports
    at once passes False).
    """

    def __init__(
        self,
        app: FastAPI,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        tls: CertFiles | None = None,
        warn_open: bool = True,
    ) -> None:
        self.app, self._host, self._port = app, host, port
        self._ssl = ReloadingSSLContext(tls) if tls is not None else None  # bad files fail here, before serving
        self._warn_open = warn_open
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    @classmethod
    def from_config(cls, app: FastAPI, config: OpsConfig, port: int | None = None, **kwargs: Any) -> OpsServer:
        """From `config` (host, port, TLS); `port` overrides `config.port` (e.g. a worker's index offset)."""
        return cls(app, config.host, config.port if port is None else port, tls=config.cert_files(), **kwargs)

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    @property
    def authenticated(self) -> bool:
        return getattr(self.app.state, "opd_auth", None) is not None

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"ops port {self._host}:{self._port} is not available ({exc}); choose another with the ops port option"
            ) from exc
        self.port = port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        config.load()
        if self._ssl is not None:
            config.ssl = self._ssl.context  # uvicorn passes it to create_server for the given socket
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the component owns signals
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        if self._warn_open:
            warn_if_open(
                getattr(self.app.state, "opd_component", "ops"), [("ops", self._host, port, self.authenticated)]
            )
        log.info("ops port listening on %s://%s:%d", self.scheme, self._host, port)
        return port

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
            except TimeoutError:
                # a client still holds a kept-alive (e.g. TLS) connection: stop waiting for it to close
                self._server.force_exit = True
                await asyncio.wait_for(self._task, timeout=5)
