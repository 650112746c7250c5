"""The gRPC servicer: authenticates, validates, schedules, encodes — and maps errors to status codes once.

`score_result` is the one request path (auth'd client, validated work, fair
scheduler, metrics); `Score`, `ScoreStream`, the ops port's JSON
`/v1/score` and the OpenAI-compatible port all go through it (and
`generate_result` for `Generate`). A bad request is answered with its status and
never disturbs other requests or the stream it came on; every request gets
exactly one answer: an exception no layer mapped becomes INTERNAL with its
message, logged with its traceback and counted
(`opd_teacher_internal_errors_total`). `add_to_server` registers the service
with deserializers that turn unparseable bytes into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from teacher_server import wire
from teacher_server.auth import Authenticator
from teacher_server.engine import GenerateResult, ScoreResult, ScoreWork, TeacherEngine
from teacher_server.errors import QueueFull, TeacherError, as_teacher_error
from teacher_server.info import TeacherInfo
from teacher_server.metrics import TeacherMetrics
from teacher_server.scheduler import FairScheduler

log = logging.getLogger(__name__)

_DRAIN = object()  # put on a stream's reply queue: finish what was accepted, then end the stream


class TeacherServicer(pb_grpc.TeacherServicer):
    def __init__(
        self,
        engine: TeacherEngine,
        scheduler: FairScheduler,
        auth: Authenticator,
        metrics: TeacherMetrics,
        *,
        stream_max_age_s: float = 0.0,
    ) -> None:
        self._engine, self._scheduler, self._auth, self._metrics = engine, scheduler, auth, metrics
        self._stream_max_age_s = stream_max_age_s  # 0 = streams live as long as their clients keep them
        self.auth = auth
        self._streams: set[asyncio.Queue] = set()

    @property
    def info(self) -> TeacherInfo:
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
        except Exception as exc:  # unexpected: answered INTERNAL with the message, logged and counted
            code = grpc.StatusCode.INTERNAL
            raise self._unexpected(exc, client, rpc) from exc
        finally:
            self._metrics.requests.labels(client, rpc, code.name).inc()
            self._metrics.request_latency.labels(client, rpc).observe(time.perf_counter() - started)

    def _unexpected(self, exc: Exception, client: str, rpc: str) -> TeacherError:
        """Log and count an exception no layer mapped; the TeacherError (INTERNAL) that answers it."""
        if isinstance(exc, TeacherError):
            return exc
        self._metrics.internal_errors.labels(rpc).inc()
        log.error("%s for client %s failed unexpectedly", rpc, client, exc_info=exc)
        return as_teacher_error(exc)

    async def _score(
        self, client: str, request: pb.ScoreRequest, timeout_s: float | None, token_ranks: bool = False
    ) -> tuple[ScoreWork, ScoreResult]:
        work = wire.score_work(request, self._engine.info)
        if token_ranks:  # the OpenAI-compatible port reports the actual token's rank, as vLLM does
            work = dataclasses.replace(work, token_ranks=True)
        result = await self._scheduler.score(client, work, timeout_s)
        self._metrics.scored_tokens.labels(client).inc(work.num_positions)
        return work, result

    async def score_result(
        self, client: str, request: pb.ScoreRequest, timeout_s: float | None, rpc: str, *, token_ranks: bool = False
    ) -> tuple[ScoreWork, ScoreResult]:
        """Validate, schedule and score one request; every failure is a TeacherError (unexpected ones INTERNAL)."""
        with self._observe(client, rpc):
            return await self._score(client, request, timeout_s, token_ranks)

    async def generate_result(self, client: str, request: pb.GenerateRequest, rpc: str) -> GenerateResult:
        """Validate and run one Generate request; every failure is a TeacherError (unexpected ones INTERNAL)."""
        with self._observe(client, rpc):
            work = wire.generate_work(request, self._engine.info)
            result = await self._engine.generate(work)
            self._metrics.generated_tokens.labels(client).inc(len(result.token_ids))
            return result

    async def _score_reply(
        self, client: str, request: pb.ScoreRequest, timeout_s: float | None, rpc: str
    ) -> pb.ScoreReply:
        """`score_result` encoded as a ScoreReply (encoding failures count as the request's failure)."""
        with self._observe(client, rpc):
            work, result = await self._score(client, request, timeout_s)
            return wire.score_reply(request, work, result)

    async def _identify(self, context: grpc.aio.ServicerContext, rpc: str) -> str:
        try:
            return self._auth.identify(context.invocation_metadata() or (), context.auth_context())
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
            return await self._score_reply(client, request, context.time_remaining(), "Score")
        except TeacherError as exc:
            await self._abort(context, exc)
            raise

    async def ScoreStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.ScoreRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ScoreReply]:
        # A failed authentication is answered per request, like any other per-request error: aborting the
        # stream while the client is still writing can surface at the client as INTERNAL instead.
        client, auth_error = "unauthenticated", None
        try:
            client = self._auth.identify(context.invocation_metadata() or (), context.auth_context())
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
                reply = await self._score_reply(client, request, timeout_s, "ScoreStream")
            except Exception as exc:  # noqa: BLE001 - every request gets exactly one reply, whatever failed
                error = self._unexpected(exc, client, "ScoreStream")
                retry = error.retry_after_s if isinstance(error, QueueFull) else 0.0
                reply = pb.ScoreReply(
                    request_id=request.request_id,
                    error=pb.Error(code=error.code.value[0], message=str(error), retry_after_s=retry),
                )
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
        # Past its age a stream ends like a drain: the client reopens it, possibly on another replica. The
        # jitter keeps the streams of one client from all ending at once.
        ender = None
        if self._stream_max_age_s > 0:
            age_s = self._stream_max_age_s * random.uniform(0.9, 1.0)
            ender = asyncio.get_running_loop().call_later(age_s, replies.put_nowait, _DRAIN)
        try:
            while (reply := await replies.get()) is not None:
                if reply is _DRAIN:  # shutting down or aged: stop reading, answer what was accepted, end
                    reader.cancel()
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                    while not replies.empty():
                        if isinstance(item := replies.get_nowait(), pb.ScoreReply):
                            yield item
                    return
                yield reply
            await reader
        finally:
            if ender is not None:
                ender.cancel()
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
        try:
            wire.check_parsed(request)
        except TeacherError as exc:
            await self._abort(context, exc)
        return self._engine.info.to_reply()

    async def Generate(  # noqa: N802
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.GenerateReply:
        client = await self._identify(context, "Generate")
        try:
            return wire.generate_reply(request, await self.generate_result(client, request, "Generate"))
        except TeacherError as exc:
            await self._abort(context, exc)
            raise


def add_to_server(servicer: TeacherServicer, server: grpc.aio.Server) -> None:
    """Register the Teacher service like the generated `add_TeacherServicer_to_server`, except that request
    bytes which do not parse reach the servicer as `wire.Malformed` and are answered INVALID_ARGUMENT naming
    the message type (the generated deserializers make gRPC answer UNKNOWN)."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=wire.lenient_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreReply.SerializeToString,
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream,
            request_deserializer=wire.lenient_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreReply.SerializeToString,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info,
            request_deserializer=wire.lenient_parser(pb.InfoRequest),
            response_serializer=pb.InfoReply.SerializeToString,
        ),
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=wire.lenient_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateReply.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # pyright: ignore[reportAttributeAccessIssue]  # not in grpc's stub yet
