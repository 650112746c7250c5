"""The teacher process: engine + scheduler + gRPC server + ops port, started and drained together.

Owns start-up order (engine loaded before the ports report ready), the
standard `grpc.health.v1` service and reflection, and graceful drain on
SIGTERM/SIGINT (health NOT_SERVING, stop intake, finish in-flight work within
`grpc.drain_grace_s`), and TLS on the gRPC and ops ports when configured
(certificates re-read when they change: `opd.tls`). `ServerThread` runs a
server on its own event loop in a background thread, for tests, benchmarks
and the demo.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opd.loop_thread import LoopThread
from opd.ops_app import OpsServer, create_ops_app, ops_auth, warn_if_open
from opd.tls import grpc_server_credentials
from protos import teacher_pb2 as pb
from teacher_server.auth import Authenticator
from teacher_server.config import TeacherConfig
from teacher_server.engine import TeacherEngine, create_engine
from teacher_server.metrics import TeacherMetrics
from teacher_server.ops_routes import teacher_router
from teacher_server.scheduler import FairScheduler
from teacher_server.servicer import TeacherServicer
from teacher_server.servicer import add_to_server as add_teacher_service

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name


class TeacherServer:
    """One teacher process's servers. `engine` may be passed in to share a loaded engine."""

    def __init__(self, config: TeacherConfig, engine: TeacherEngine | None = None) -> None:
        self.config = config
        self.metrics = TeacherMetrics()
        self.engine = engine
        self._owns_engine = engine is None
        # Config errors (tokens, certificates) surface before the engine loads.
        self._auth = Authenticator(config.auth)
        grpc_tls = config.grpc.cert_files()
        self._grpc_credentials = grpc_server_credentials(grpc_tls) if grpc_tls is not None else None
        self._ops_auth = ops_auth(config.ops) or (self._auth if self._auth.enabled else None)
        if (ops_tls := config.ops.cert_files()) is not None:
            ops_tls.load()
        self._grpc: grpc.aio.Server | None = None
        self._ops: OpsServer | None = None
        self._openai = None  # teacher_server.openai_api.OpenAIPort when openai.port is set
        self.openai_port: int | None = None
        # grpcio-health-checking's stubs leave out its aio module
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()  # pyright: ignore[reportAttributeAccessIssue]
        self.scheduler: FairScheduler | None = None
        self.grpc_port: int | None = None
        self.ops_port: int | None = None
        self._stopped = asyncio.Event()
        # /readyz answers what gRPC health answers: ready only between SERVING (end of start) and NOT_SERVING (drain).
        self._grpc_serving = False

    async def start(self) -> None:
        if self.engine is None:
            self.engine = create_engine(self.config)
        inflight = self.config.scheduler.max_inflight_batches or self.engine.preferred_inflight_batches
        self.scheduler = FairScheduler(
            self.engine, self.config.scheduler, self.metrics, inflight, policy_of=self._auth.policy
        )
        self.scheduler.start()
        age_s = self.config.grpc.max_connection_age_s
        servicer = TeacherServicer(self.engine, self.scheduler, self._auth, self.metrics, stream_max_age_s=age_s)
        self._servicer = servicer
        max_bytes = self.config.grpc.max_message_mb * 1024 * 1024
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
                *_connection_age_options(self.config),
            ]
        )
        add_teacher_service(servicer, self._grpc)  # unparseable request bytes: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        address = f"{self.config.grpc.host}:{self.config.grpc.port}"
        if self._grpc_credentials is not None:
            self.grpc_port = self._grpc.add_secure_port(address, self._grpc_credentials)
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC to {address}; choose another --grpc-port")
        await self._grpc.start()
        app = create_ops_app(
            "teacher",
            self.metrics.registry,
            ready=lambda: self._grpc_serving,
            routers=[teacher_router(servicer)],
            auth=self._ops_auth,
        )
        self._ops = OpsServer.from_config(app, self.config.ops, warn_open=False)
        self.ops_port = await self._ops.start()
        listeners = [
            ("gRPC", self.config.grpc.host, self.grpc_port, self._auth.enabled),
            ("ops", self.config.ops.host, self.ops_port, self._ops_auth is not None),
        ]
        if self.config.openai.port is not None:  # the OpenAI-compatible port: off unless configured
            from teacher_server.openai_api import OpenAIPort

            self._openai = OpenAIPort(self.config, servicer)
            self.openai_port = await self._openai.start()
            listeners.append(("OpenAI", self.config.openai.host, self.openai_port, self._auth.enabled))
        warn_if_open("teacher", listeners)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.metrics.engine_ready.set(1)
        log.info(
            "teacher %s (%s) serving gRPC on %s:%d, ops on %s:%d",
            self.engine.info.model_name,
            self.engine.info.backend,
            self.config.grpc.host,
            self.grpc_port,
            self.config.ops.host,
            self.ops_port,
        )

    async def _set_health(self, status: int) -> None:
        self._grpc_serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            result = self._health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, stop intake, finish in-flight work within the grace period, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grpc.drain_grace_s if grace_s is None else grace_s
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.scheduler is not None:
            self.scheduler.stop_intake()
            self._servicer.begin_drain()
            await self.scheduler.drain(grace)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._ops is not None:
            await self._ops.stop()
        if self._openai is not None:
            await self._openai.stop()
        if self._owns_engine and self.engine is not None:
            await self.engine.close()
        log.info("teacher stopped")

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("signal received: draining (grace %.0f s)", self.config.grpc.drain_grace_s)
        await self.stop()


def _connection_age_options(config: TeacherConfig) -> list[tuple[str, int]]:
    """GOAWAY after `max_connection_age_s` (clients reconnect and re-resolve names). A ScoreStream ends
    itself at the same age (the servicer), so a stream opened just before the GOAWAY may live one more age;
    gRPC's hard close waits that long plus the grace."""
    age_s, grace_s = config.grpc.max_connection_age_s, config.grpc.max_connection_age_grace_s
    if age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int((age_s + grace_s) * 1000)),
    ]


class ServerThread:
    """Run a TeacherServer on a private event loop in a daemon thread (tests, benchmarks, the demo)."""

    def __init__(self, config: TeacherConfig, engine_factory=None) -> None:
        self._config, self._engine_factory = config, engine_factory
        self._loop_thread: LoopThread | None = None
        self.server: TeacherServer | None = None

    def call(self, coro, timeout_s: float | None = 600):
        """Run a coroutine on the server's loop and wait for its result."""
        assert self._loop_thread is not None
        return self._loop_thread.call(coro, timeout_s)

    def start(self, timeout_s: float = 600) -> ServerThread:
        self._loop_thread = LoopThread("teacher-server")

        async def _start() -> TeacherServer:
            engine = self._engine_factory() if self._engine_factory else None
            server = TeacherServer(self._config, engine)
            await server.start()
            return server

        self.server = self.call(_start(), timeout_s)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def openai_url(self) -> str:
        """Base URL of the OpenAI-compatible port (`.../v1`), when the config turned it on."""
        assert self.server is not None and self.server._openai is not None, "set openai.port to serve it"
        return f"{self.server._openai.scheme}://127.0.0.1:{self.server.openai_port}/v1"

    @property
    def ops_url(self) -> str:
        assert self.server is not None and self.server._ops is not None
        return f"{self.server._ops.scheme}://127.0.0.1:{self.server.ops_port}"

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace_s), timeout_s=grace_s + 30)
        if self._loop_thread is not None:
            self._loop_thread.stop()

    def __enter__(self) -> ServerThread:
        return self.start() if self.server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
