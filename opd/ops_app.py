"""The HTTP ops port every long-running process serves (FastAPI on uvicorn).

Owns the shared routes — `/metrics` (Prometheus text from the component's own
registry), `/healthz` (process alive), `/readyz` (component ready, 503 until
then) — and running uvicorn inside the component's asyncio loop on a given or
ephemeral port. Components add their own routes (`/v1/info`, `/status`, ...)
through an APIRouter; nothing component-specific lives here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def create_ops_app(component: str, registry: CollectorRegistry, ready: Callable[[], bool],
                   routers: list[APIRouter] | None = None) -> FastAPI:
    """Build the ops app of one component; `ready()` decides /readyz."""
    app = FastAPI(title=f"opd {component} ops", docs_url="/docs", redoc_url=None)

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
    return app


class OpsServer:
    """uvicorn serving an ops app inside the caller's event loop; `port=0` binds an ephemeral port."""

    def __init__(self, app: FastAPI, host: str = "0.0.0.0", port: int = 0) -> None:
        self._app, self._host, self._port = app, host, port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise OSError(f"ops port {self._host}:{self._port} is not available ({exc}); "
                          f"choose another with the ops port option") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the component owns signals
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        log.info("ops port listening on %s:%d", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, timeout=10)
