"""`TeacherClient`: the public client of the teacher service (grpc + numpy only; no torch import).

Many requests share one bidirectional `ScoreStream` per lane; replies are
matched by `request_id`. Lanes are (target, stream) pairs used round-robin:
several addresses, or a `dns:///name:port` target (Kubernetes headless
service) whose channel uses gRPC's `round_robin` policy so that its several
streams land on different replicas. Every request has a deadline; UNAVAILABLE
(server down or restarting, stream broken) and RESOURCE_EXHAUSTED (queue full,
after the server's retry hint) are retried with capped exponential backoff
until the deadline, so a server restart mid-stream loses no request. Each
retry is counted in `retry_stats` (by target and status code) and logged at
WARNING with the target, the attempt and the next delay, at most once per
10 s per target. A stream the server ends at its maximum age (or drain) is
reopened, possibly on another replica, and its unanswered requests are resent
at once.

Shapes (P = len(token_ids) - score_from positions, k = top_k, V = vocab):
`token_logprobs [P]`, `topk_ids [P, k]` int32, `topk_logprobs [P, k]`,
`tail_logprobs [P]`, `full_logprobs [P, V]` or None; log-probs are float32
(16-bit on the wire when asked, widened on receipt).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import grpc
import numpy as np

from opd.loop_thread import LoopThread
from opd.retry import Backoff, RetryLog, RetryStats, retry_async
from opd.tls import grpc_channel_credentials
from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack, unpack
from teacher_server.info import TeacherInfo

__all__ = [
    "DeadlineExceeded",
    "Generation",
    "InvalidArgument",
    "ResourceExhausted",
    "TeacherClient",
    "TeacherClientError",
    "TeacherClientSync",
    "TeacherInfo",
    "TeacherScores",
    "Unauthenticated",
    "Unavailable",
    "error_from_status",
]

_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
_BACKOFF = Backoff(initial_s=0.05, max_s=2.0)  # frozen: one shared default
log = logging.getLogger(__name__)
T = TypeVar("T")


class _Routed(Protocol):
    """Where one attempt goes (a stream lane or a unary stub): its target names it in retry reports."""

    @property
    def target(self) -> str: ...


L = TypeVar("L", bound=_Routed)


# -- errors: status codes mapped back to exceptions ------------------------------------------


class TeacherClientError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable = False


class InvalidArgument(TeacherClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(TeacherClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(TeacherClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TeacherClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(TeacherClientError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class _StreamEnded(Unavailable):
    """The server ended a ScoreStream with OK (its maximum age, or a drain) before answering this request:
    an expected event, resent at once without a warning."""


_BY_CODE = {
    cls.code: cls for cls in (InvalidArgument, Unauthenticated, ResourceExhausted, DeadlineExceeded, Unavailable)
}


def error_from_status(code: grpc.StatusCode, message: str, retry_after_s: float = 0.0) -> TeacherClientError:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message, retry_after_s)
    cls = _BY_CODE.get(code, TeacherClientError)
    exc = cls(f"{code.name}: {message}")
    exc.code = code
    return exc


def _from_rpc_error(err: grpc.aio.AioRpcError) -> TeacherClientError:
    retry = next((float(v) for k, v in (err.trailing_metadata() or ()) if k == "retry-after-s"), 0.0)
    if err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN) and "Socket closed" in (err.details() or ""):
        return Unavailable(f"UNAVAILABLE: {err.details()}")
    return error_from_status(err.code(), err.details() or "", retry)


# -- results -----------------------------------------------------------------------------------


@dataclass
class TeacherScores:
    """The teacher's reply for one sequence, in numpy (shapes above): the one scores type of opd.

    The trainer turns the replies of a micro-batch into torch tensors in one function, on its side.
    """

    request_id: str
    score_from: int
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprobs: np.ndarray
    full_logprobs: np.ndarray | None = None

    @classmethod
    def from_reply(cls, reply: pb.ScoreReply) -> TeacherScores:
        def f32(field: str) -> np.ndarray:
            return unpack(getattr(reply, field), field=field).astype(np.float32, copy=False)

        return cls(
            request_id=reply.request_id,
            score_from=reply.score_from,
            token_logprobs=f32("token_logprobs"),
            topk_ids=unpack(reply.topk_ids, field="topk_ids"),
            topk_logprobs=f32("topk_logprobs"),
            tail_logprobs=f32("tail_logprobs"),
            full_logprobs=f32("full_logprobs") if reply.HasField("full_logprobs") else None,
        )


@dataclass
class Generation:
    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    finish_reason: str


# -- one stream ------------------------------------------------------------------------------


class _Lane:
    """One ScoreStream on one channel; opened lazily, reopened after it breaks."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], target: str = "") -> None:
        self.target = target
        self._stub = pb_grpc.TeacherStub(channel)
        self._metadata = metadata
        self._call: grpc.aio.StreamStreamCall | None = None
        self._pending: dict[str, asyncio.Future[pb.ScoreReply]] = {}
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    def _open(self) -> grpc.aio.StreamStreamCall:
        call = self._call
        if call is None or call.done():
            call = self._call = self._stub.ScoreStream(metadata=self._metadata)
            self._reader = asyncio.create_task(self._read(call))
        return call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        failure: TeacherClientError = _StreamEnded("UNAVAILABLE: score stream ended by the server")
        try:
            async for reply in call:
                future = self._pending.pop(reply.request_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as err:
            failure = _from_rpc_error(err)
        except asyncio.CancelledError:
            failure = Unavailable("UNAVAILABLE: client closed")
        if self._call is call:
            self._call = None
        for rid, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(failure)
            self._pending.pop(rid, None)

    async def send(self, request: pb.ScoreRequest, timeout_s: float) -> pb.ScoreReply:
        future: asyncio.Future[pb.ScoreReply] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            async with self._write_lock:
                call = self._open()
                try:
                    await asyncio.wait_for(call.write(request), timeout_s)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as err:
                    if future.done() and (failure := future.exception()) is not None:
                        raise failure from None
                    why = err.details() if isinstance(err, grpc.aio.AioRpcError) else err
                    raise Unavailable(f"UNAVAILABLE: cannot write to the score stream ({why})") from None
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("DEADLINE_EXCEEDED: no reply from the teacher within the deadline") from None
        finally:
            self._pending.pop(request.request_id, None)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@dataclass(frozen=True)
class _Unary:
    """Where a unary call goes: a target and the stub of its channel."""

    target: str
    stub: pb_grpc.TeacherStub


# -- the client ---------------------------------------------------------------------------


class TeacherClient:
    """Async client. Use `async with TeacherClient(["host:50051"]) as c: scores = await c.score(ids, 10, top_k=20)`."""

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        token: str | None = None,
        client_name: str | None = None,
        timeout_s: float = 120.0,
        backoff: Backoff = _BACKOFF,
        streams_per_target: int | None = None,
        logprob_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        max_message_mb: int = 256,
        retry_stats: RetryStats | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """TLS is on when `tls` or any `tls_*_file` is given: the server is verified against `tls_ca_file`
        (default: the system's CAs), `tls_cert_file`/`tls_key_file` are presented for mutual TLS, and
        `tls_server_name` overrides the name checked in the server's certificate (default: the target's host)."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("TeacherClient needs at least one target address (host:port or dns:///name:port)")
        use_tls = tls or any((tls_ca_file, tls_cert_file, tls_key_file))
        credentials = (
            grpc_channel_credentials(tls_ca_file, tls_cert_file, tls_key_file, option="teacher.tls")
            if use_tls
            else None
        )
        if token and not use_tls and not all(_is_loopback(t) for t in targets):
            log.warning(
                "the teacher token is sent without TLS to %s: anyone on the path can read it; "
                "turn TLS on (teacher.tls_ca_file, or teacher.tls for the system CAs)",
                ", ".join(targets),
            )
        self._timeout_s, self._backoff, self._dtype = timeout_s, backoff, _DTYPES[logprob_dtype]
        metadata = [("x-opd-client", client_name)] if client_name else []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(metadata)
        opts = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channels = [
            grpc.aio.secure_channel(t, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(t, options=opts)
            for t in targets
        ]
        lanes = []
        for target, channel in zip(targets, self._channels, strict=True):
            n = streams_per_target or (4 if target.startswith("dns:") else 1)
            lanes += [_Lane(channel, self._metadata, target) for _ in range(n)]
        self._lanes = lanes
        self._next = itertools.cycle(range(len(lanes)))
        unary = [_Unary(t, pb_grpc.TeacherStub(c)) for t, c in zip(targets, self._channels, strict=True)]
        self._stubs = itertools.cycle(unary)
        # Every retry is counted here (by target and status code) and logged at WARNING, rate-bounded.
        self._retries = RetryLog(log, "teacher call", stats=retry_stats)
        self.retry_stats = self._retries.stats

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for lane in self._lanes:
            await lane.close()
        for channel in self._channels:
            await channel.close()

    async def _with_retries(
        self, route: Callable[[], L], attempt_fn: Callable[[L, float], Awaitable[T]], timeout_s: float | None
    ) -> T:
        """Call `attempt_fn(target, remaining_s)` on `route()`'s next target until it succeeds, fails for good
        or the deadline passes; retryable failures wait a capped, jittered backoff, or the server's hint when
        longer (`opd.retry.retry_async`)."""
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        target: L | None = None

        async def attempt() -> T:
            nonlocal target
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("DEADLINE_EXCEEDED: teacher did not answer within the deadline")
            target = route()
            try:
                return await attempt_fn(target, remaining)
            except grpc.aio.AioRpcError as err:
                raise _from_rpc_error(err) from None

        def note(attempt_no: int, exc: BaseException, delay_s: float) -> None:
            code = exc.code.name if isinstance(exc, TeacherClientError) else type(exc).__name__
            self._retries.note(target.target if target is not None else "", attempt_no, delay_s, str(exc), code)

        return await retry_async(
            attempt,
            retryable=lambda exc: isinstance(exc, TeacherClientError) and exc.retryable,
            backoff=self._backoff,
            max_attempts=None,
            deadline_s=deadline,
            on_retry=note,
            min_delay_s=lambda exc: getattr(exc, "retry_after_s", 0.0),
            # a stream that reached its maximum age: resent at once (the lane reopens it)
            resend_at_once=lambda exc: isinstance(exc, _StreamEnded),
        )

    async def score(
        self,
        token_ids: Sequence[int] | np.ndarray,
        score_from: int,
        *,
        top_k: int = 0,
        full_vocab: bool = False,
        temperature: float | None = None,
        timeout_s: float | None = None,
    ) -> TeacherScores:
        """Teacher log-probs for positions [score_from, len(token_ids)) of one sequence."""
        request = pb.ScoreRequest(
            request_id=uuid.uuid4().hex,
            token_ids=pack(np.asarray(token_ids), pb.INT32),
            score_from=score_from,
            top_k=top_k,
            full_vocab=full_vocab,
            logprob_dtype=self._dtype,
        )
        if temperature is not None:
            request.temperature = temperature

        async def attempt(lane: _Lane, remaining: float) -> TeacherScores:
            request.timeout_ms = max(1, int(remaining * 1000))
            reply = await lane.send(request, remaining)
            if reply.HasField("error"):
                raise error_from_status(
                    grpc.StatusCode(_code(reply.error.code)), reply.error.message, reply.error.retry_after_s
                )
            return TeacherScores.from_reply(reply)

        return await self._with_retries(lambda: self._lanes[next(self._next)], attempt, timeout_s)

    async def score_many(
        self, sequences: Sequence[tuple[Sequence[int] | np.ndarray, int]], **kwargs: Any
    ) -> list[TeacherScores]:
        """Score many (token_ids, score_from) pairs concurrently; results in input order."""
        return list(await asyncio.gather(*(self.score(ids, start, **kwargs) for ids, start in sequences)))

    async def info(self, timeout_s: float | None = None) -> TeacherInfo:
        async def attempt(unary: _Unary, remaining: float) -> TeacherInfo:
            reply = await unary.stub.Info(pb.InfoRequest(), timeout=remaining, metadata=self._metadata)
            return TeacherInfo.from_reply(reply)

        return await self._with_retries(lambda: next(self._stubs), attempt, timeout_s)

    async def generate(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        timeout_s: float | None = None,
    ) -> Generation:
        """Sample from the teacher. Generation is retried on UNAVAILABLE (a new sample, not a replay)."""
        request = pb.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_ids=pack(np.asarray(prompt_ids), pb.INT32),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=list(stop_token_ids),
        )
        if seed is not None:
            request.seed = seed

        async def attempt(unary: _Unary, remaining: float) -> Generation:
            reply = await unary.stub.Generate(request, timeout=remaining, metadata=self._metadata)
            return Generation(
                unpack(reply.token_ids, field="token_ids"),
                unpack(reply.logprobs, field="logprobs").astype(np.float32),
                reply.finish_reason,
            )

        return await self._with_retries(lambda: next(self._stubs), attempt, timeout_s)


def _is_loopback(target: str) -> bool:
    """`127.0.0.1:50051`, `localhost:50051`, `[::1]:50051`, `dns:///localhost:50051` or a unix socket."""
    if target.startswith("unix:"):
        return True
    host = target.split("///", 1)[-1]
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host in ("localhost", "::1") or host.startswith("127.")


def _code(value: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


class TeacherClientSync:
    """Blocking wrapper for scripts: the async client on a private event loop thread."""

    def __init__(self, targets: str | Sequence[str], **kwargs: Any) -> None:
        self._io = LoopThread("teacher-client")
        self._client: TeacherClient = self._run(self._make(targets, kwargs))

    @staticmethod
    async def _make(targets: str | Sequence[str], kwargs: dict[str, Any]) -> TeacherClient:
        return TeacherClient(targets, **kwargs)

    def _run(self, coro):
        return self._io.call(coro)

    def score(self, token_ids: Sequence[int] | np.ndarray, score_from: int, **kwargs: Any) -> TeacherScores:
        return self._run(self._client.score(token_ids, score_from, **kwargs))

    def score_many(
        self, sequences: Sequence[tuple[Sequence[int] | np.ndarray, int]], **kwargs: Any
    ) -> list[TeacherScores]:
        return self._run(self._client.score_many(sequences, **kwargs))

    def info(self, **kwargs: Any) -> TeacherInfo:
        return self._run(self._client.info(**kwargs))

    def generate(self, prompt_ids: Sequence[int] | np.ndarray, **kwargs: Any) -> Generation:
        return self._run(self._client.generate(prompt_ids, **kwargs))

    def close(self) -> None:
        self._run(self._client.close())
        self._io.stop()

    def __enter__(self) -> TeacherClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
