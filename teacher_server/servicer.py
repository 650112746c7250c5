"""The gRPC servicer: authenticates, validates, schedules, encodes — and maps errors to status codes once.

`score_result` is the one request path (auth'd client, validated work, fair
scheduler, metrics); `Score`, `ScoreStream` and the ops port's JSON
`/v1/score` all go through it. A bad request is answered with its status and
never disturbs other requests or the stream it came on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from opd import __version__
from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from teacher_server import wire
from teacher_server.auth import Authenticator
from teacher_server.engine import ScoreResult, ScoreWork, TeacherEngine
from teacher_server.errors import QueueFull, TeacherError
from teacher_server.metrics import TeacherMetrics
from teacher_server.scheduler import FairScheduler

log = logging.getLogger(__name__)

_DRAIN = object()  # put on a stream's reply queue: finish what was accepted, then end the stream


class TeacherServicer(pb_grpc.TeacherServicer):
    def __init__(self, engine: TeacherEngine, scheduler: FairScheduler, auth: Authenticator,
                 metrics: TeacherMetrics) -> None:
        self._engine, self._scheduler, self._auth, self._metrics = engine, scheduler, auth, metrics
        self.auth = auth
        self._streams: set[asyncio.Queue] = set()

    @property
    def info(self):  # -> EngineInfo
        return self._engine.info

    @contextlib.contextmanager
    def _observe(self, client: str, rpc: str) -> Iterator[None]:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except TeacherError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._metrics.requests.labels(client, rpc, code.name).inc()
            self._metrics.request_latency.labels(client, rpc).observe(time.perf_counter() - started)

    async def score_result(self, client: str, request: pb.ScoreRequest, timeout_s: float | None,
                           rpc: str) -> tuple[ScoreWork, ScoreResult]:
        with self._observe(client, rpc):
            work = wire.score_work(request, self._engine.info)
            result = await self._scheduler.score(client, work, timeout_s)
            self._metrics.scored_tokens.labels(client).inc(work.num_positions)
            return work, result

    async def _identify(self, context: grpc.aio.ServicerContext, rpc: str) -> str:
        try:
            return self._auth.identify(context.invocation_metadata() or ())
        except TeacherError as exc:
            self._metrics.requests.labels("unauthenticated", rpc, exc.code.name).inc()
            await context.abort(exc.code, str(exc))
            raise  # unreachable: abort raises

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: TeacherError) -> None:
        trailers = (("retry-after-s", str(exc.retry_after_s)),) if isinstance(exc, QueueFull) else ()
        await context.abort(exc.code, str(exc), trailing_metadata=trailers)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreReply:  # noqa: N802
        client = await self._identify(context, "Score")
        try:
            work, result = await self.score_result(client, request, context.time_remaining(), "Score")
            return wire.score_reply(request, work, result)
        except TeacherError as exc:
            await self._abort(context, exc)
            raise

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreReply]:
        # A failed authentication is answered per request, like any other per-request error: aborting the
        # stream while the client is still writing can surface at the client as INTERNAL instead.
        client, auth_error = "unauthenticated", None
        try:
            client = self._auth.identify(context.invocation_metadata() or ())
        except TeacherError as exc:
            auth_error = exc
        replies: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ScoreRequest) -> None:
            timeout_s = request.timeout_ms / 1000 if request.timeout_ms else context.time_remaining()
            try:
                if auth_error is not None:
                    self._metrics.requests.labels(client, "ScoreStream", auth_error.code.name).inc()
                    raise auth_error
                work, result = await self.score_result(client, request, timeout_s, "ScoreStream")
                reply = wire.score_reply(request, work, result)
            except TeacherError as exc:
                retry = exc.retry_after_s if isinstance(exc, QueueFull) else 0.0
                reply = pb.ScoreReply(request_id=request.request_id,
                                      error=pb.Error(code=exc.code.value[0], message=str(exc), retry_after_s=retry))
            await replies.put(reply)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks), return_exceptions=True)
            await replies.put(None)

        reader = asyncio.create_task(read())
        self._streams.add(replies)
        try:
            while (reply := await replies.get()) is not None:
                if reply is _DRAIN:  # shutting down: stop reading, answer what was accepted, end the stream
                    reader.cancel()
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                    while not replies.empty():
                        if isinstance(item := replies.get_nowait(), pb.ScoreReply):
                            yield item
                    return
                yield reply
            await reader
        finally:
            self._streams.discard(replies)
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    def begin_drain(self) -> None:
        """End every open ScoreStream once its accepted requests are answered (clients reconnect elsewhere)."""
        for replies in list(self._streams):
            replies.put_nowait(_DRAIN)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:  # noqa: N802
        await self._identify(context, "Info")
        return wire.info_reply(self._engine.info, __version__)

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.GenerateReply:
        client = await self._identify(context, "Generate")
        try:
            with self._observe(client, "Generate"):
                work = wire.generate_work(request, self._engine.info)
                result = await self._engine.generate(work)
                self._metrics.generated_tokens.labels(client).inc(len(result.token_ids))
                return wire.generate_reply(request, result)
        except TeacherError as exc:
            await self._abort(context, exc)
            raise
