"""Batching and fair scheduling of scoring work across clients.

Owns the bounded queue (requests and tokens), per-client fair share by tokens
(start-time fair queueing: the client with the least virtual time — tokens
already served, caught up to the busiest active client when it returns from
idle — goes next), forming batches up to a token / request budget, running up
to `inflight_batches` batches in the engine at once, and dropping work whose
caller cancelled or whose deadline passed before it reached the engine.
Does not validate requests, encode replies or know about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from teacher_server.config import SchedulerConfig
from teacher_server.engine import ScoreResult, ScoreWork, TeacherEngine
from teacher_server.errors import DeadlineExpired, Draining, EngineFailed, QueueFull
from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    client: str
    work: ScoreWork
    future: asyncio.Future[ScoreResult]
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value


class FairScheduler:
    """Queue + batcher in front of one engine. Create and use it on the server's event loop."""

    def __init__(
        self, engine: TeacherEngine, config: SchedulerConfig, metrics: TeacherMetrics, inflight_batches: int
    ) -> None:
        self._engine, self._cfg, self._metrics = engine, config, metrics
        self._queues: dict[str, collections.deque[_Pending]] = {}
        self._vtime: dict[str, float] = collections.defaultdict(float)
        self._queued_requests = 0
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._running_requests = 0
        self._accepting = True
        self._loop_task: asyncio.Task[None] | None = None
        self._avg_batch_s = 0.05

    # -- intake ---------------------------------------------------------------------------

    def submit(self, client: str, work: ScoreWork, timeout_s: float | None) -> asyncio.Future[ScoreResult]:
        """Queue `work`; the future resolves to its ScoreResult. Raises QueueFull / Draining."""
        if not self._accepting:
            raise Draining("teacher is shutting down; retry on another replica")
        while self._is_full(work.num_tokens):
            self._make_room_for(client, work.num_tokens)
        queue = self._queues.setdefault(client, collections.deque())
        if not queue:  # returning from idle: no credit for the time away
            self._vtime[client] = max(self._vtime[client], self._min_active_vtime())
        future: asyncio.Future[ScoreResult] = asyncio.get_running_loop().create_future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        queue.append(_Pending(client, work, future, deadline=deadline))
        self._queued_requests += 1
        self._queued_tokens += work.num_tokens
        self._metrics.queue_depth.set(self._queued_requests)
        self._wakeup.set()
        return future

    def _is_full(self, num_tokens: int) -> bool:
        return (
            self._queued_requests >= self._cfg.max_queued_requests
            or self._queued_tokens + num_tokens > self._cfg.max_queued_tokens
        )

    def _queue_full(self) -> QueueFull:
        retry = self._retry_hint_s()
        return QueueFull(
            f"teacher queue is full ({self._queued_requests} requests, {self._queued_tokens} "
            f"tokens queued); retry in {retry:.2f} s",
            retry_after_s=retry,
        )

    def _make_room_for(self, client: str, num_tokens: int) -> None:
        """Per-client admission when the queue is full: push out the heaviest client's newest request.

        The queue bound is shared, so without this one flooding client fills it and every other
        client is refused too. A request is admitted by evicting the newest queued request of the
        client holding the most queued tokens, when that client would still hold more than the
        requester after the swap; the evicted request is answered RESOURCE_EXHAUSTED with the
        retry hint, exactly as a refusal at intake. Raises QueueFull when no such client exists.
        """
        held = {c: sum(p.work.num_tokens for p in q) for c, q in self._queues.items() if q}
        mine = held.get(client, 0) + num_tokens
        heaviest = max(held, key=held.__getitem__, default=None)
        if heaviest is None or heaviest == client or held[heaviest] <= mine:
            raise self._queue_full()
        victim = self._queues[heaviest].pop()
        self._queued_requests -= 1
        self._queued_tokens -= victim.work.num_tokens
        if not victim.future.done():
            victim.future.set_exception(self._queue_full())

    async def score(self, client: str, work: ScoreWork, timeout_s: float | None) -> ScoreResult:
        future = self.submit(client, work, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: the batcher skips it
            raise

    # -- the batching loop ----------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="teacher-scheduler")

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            await self._slots.acquire()
            if self._cfg.batch_wait_ms and self._queued_tokens < self._cfg.max_batch_tokens and self._inflight:
                await asyncio.sleep(self._cfg.batch_wait_ms / 1000)
            batch = self._take_batch()
            if not self._queued_requests:
                self._wakeup.clear()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        tokens = 0
        now = time.monotonic()
        while self._queued_requests and len(batch) < self._cfg.max_batch_requests:
            client = min((c for c, q in self._queues.items() if q), key=self._vtime.__getitem__)
            head = self._queues[client][0]
            if batch and tokens + head.work.num_tokens > self._cfg.max_batch_tokens:
                break
            self._pop(client)
            if head.future.done():  # cancelled by its caller
                continue
            if head.deadline is not None and now >= head.deadline:
                head.future.set_exception(DeadlineExpired("deadline passed while queued; the work was dropped"))
                continue
            self._vtime[client] += head.work.num_tokens
            self._metrics.queue_wait.labels(client).observe(now - head.enqueued_at)
            batch.append(head)
            tokens += head.work.num_tokens
        self._metrics.queue_depth.set(self._queued_requests)
        return batch

    def _pop(self, client: str) -> _Pending:
        item = self._queues[client].popleft()
        self._queued_requests -= 1
        self._queued_tokens -= item.work.num_tokens
        return item

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        self._running_requests += len(batch)
        self._metrics.inflight_batches.inc()
        self._metrics.batch_requests.observe(len(batch))
        self._metrics.batch_tokens.observe(sum(p.work.num_tokens for p in batch))
        try:
            results = await self._engine.score_batch([p.work for p in batch])
        except Exception as exc:  # the engine failed: every request in the batch gets the error
            log.exception("engine failed on a batch of %d requests", len(batch))
            results = [EngineFailed(f"teacher engine error: {exc}")] * len(batch)
        finally:
            elapsed = time.monotonic() - started
            self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * elapsed
            self._metrics.engine_busy.inc(elapsed)
            self._metrics.inflight_batches.dec()
            self._running_requests -= len(batch)
            self._slots.release()
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    # -- helpers --------------------------------------------------------------------------

    def _min_active_vtime(self) -> float:
        active = [self._vtime[c] for c, q in self._queues.items() if q]
        return min(active) if active else max(self._vtime.values(), default=0.0)

    def _retry_hint_s(self) -> float:
        batches_queued = max(1.0, self._queued_tokens / self._cfg.max_batch_tokens)
        return round(min(30.0, max(0.05, batches_queued * self._avg_batch_s)), 3)

    @property
    def accepted_requests(self) -> int:
        """Requests queued or running in the engine."""
        return self._queued_requests + self._running_requests

    def stop_intake(self) -> None:
        self._accepting = False

    async def drain(self, grace_s: float) -> None:
        """Stop intake, let queued and running work finish within `grace_s`, then cancel the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while (self._queued_requests or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._loop_task is not None:
            self._loop_task.cancel()
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(Draining("teacher shut down before this request ran"))
        self._queued_requests = self._queued_tokens = 0
