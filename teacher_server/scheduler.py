"""Batching and fair scheduling of scoring work across clients.

Owns the bounded queue (requests and tokens), each team's queue caps (from the
tokens file: `max_queued_tokens`, `max_queued_requests`), per-client fair share
by weighted tokens (start-time fair queueing: the client with the least
virtual time — tokens already served divided by its weight, caught up to the
least active client's when it returns from idle — goes next), forming batches
up to a token / request budget, running up to `inflight_batches` batches in
the engine at once, and dropping work whose caller cancelled or whose deadline
passed before it reached the engine. A team's weight and caps are read at each
of its requests (`policy_of`), so an edited tokens file takes effect without a
restart.

On an engine that batches requests itself (`TeacherEngine.step_tokens`
set: vllm), bulk work is instead handed over request by request, at most
`bulk_engine_steps` engine steps' worth of tokens at once (plus one request),
and each request frees its room when it is answered: the engine's next step
is (about) full, and everything beyond that bound waits here, where the fair
queue (weights, caps) decides its order, instead of inside the engine in
arrival order. `max_inflight_batches` does not apply there.

Latency isolation (`express_lane`): while the clients together offer more
tokens/s than the engine delivers (measured), a request whose client has
(about) nothing in the fair queue and offers at most `express_max_share`
(1/2) of its max-min fair share (weighted) goes to the express lane instead
of the fair queue. The
express lane runs its own small batches beside the bulk batches, at once (no
batch wait), through `TeacherEngine.score_batch_express`, which each backend
gives priority over its bulk work (hf: a second thread, and the running bulk
batch parks at its next module boundary until the express batch is done,
`preemption.py`; a high-priority CUDA stream on GPU; vllm: request priority). So a team
within its share does not wait behind a batch filled by a team that floods:
the flooder's work is what it is, it only shares the engine with light
requests. Does not validate requests, encode replies or know about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opd.auth import DEFAULT_POLICY, TeamPolicy
from teacher_server.config import SchedulerConfig
from teacher_server.engine import ScoreResult, ScoreWork, TeacherEngine
from teacher_server.errors import DeadlineExpired, Draining, EngineFailed, InvalidRequest, QueueFull
from teacher_server.metrics import TeacherMetrics
from teacher_server.preemption import YieldStats
from teacher_server.throughput import ClientRates, EngineThroughput, fair_level

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    client: str
    work: ScoreWork
    future: asyncio.Future[ScoreResult]
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value


def _resolve(pending: _Pending, result: ScoreResult | Exception) -> None:
    if pending.future.done():  # its caller went away
        return
    if isinstance(result, Exception):
        pending.future.set_exception(result)
    else:
        pending.future.set_result(result)


class FairScheduler:
    """Queue + batcher in front of one engine. Create and use it on the server's event loop."""

    def __init__(
        self,
        engine: TeacherEngine,
        config: SchedulerConfig,
        metrics: TeacherMetrics,
        inflight_batches: int,
        policy_of: Callable[[str], TeamPolicy] | None = None,
    ) -> None:
        self._engine, self._cfg, self._metrics = engine, config, metrics
        self._policy_of = policy_of or (lambda _client: DEFAULT_POLICY)
        self._queues: dict[str, collections.deque[_Pending]] = {}
        self._vtime: dict[str, float] = collections.defaultdict(float)
        self._weight: dict[str, float] = {}
        self._held_tokens: dict[str, int] = collections.defaultdict(int)  # queued tokens per client
        self._queued_requests = 0
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._running_requests = 0
        self._accepting = True
        self._loop_task: asyncio.Task[None] | None = None
        self._express_task: asyncio.Task[None] | None = None
        self._throughput = EngineThroughput()
        self._rates = ClientRates()
        self._express: collections.deque[_Pending] = collections.deque()  # light clients' requests, FIFO
        self._express_tokens = 0
        self._express_held: dict[str, int] = collections.defaultdict(int)  # express-queued tokens per client
        self._express_wakeup = asyncio.Event()
        self._yields_seen = YieldStats()  # the engine's totals last exported to the metrics
        # engines that batch requests themselves (vllm): bulk work in the engine bounded by tokens, released per
        # request as it is answered, so the fair queue (not the engine's arrival order) decides what runs next
        steps, step_tokens = config.bulk_engine_steps, engine.step_tokens
        self._bulk_budget = math.ceil(steps * step_tokens) if steps and step_tokens else None
        self._bulk_in_engine = 0  # tokens of bulk requests handed to the engine and not yet answered
        self._room = asyncio.Event()

    # -- intake ---------------------------------------------------------------------------

    def submit(self, client: str, work: ScoreWork, timeout_s: float | None) -> asyncio.Future[ScoreResult]:
        """Queue `work`; the future resolves to its ScoreResult. Raises QueueFull / Draining."""
        if not self._accepting:
            raise Draining("teacher is shutting down; retry on another replica")
        now = time.monotonic()
        self._rates.add(client, work.num_tokens, now)  # offered load: refused requests count too
        self._apply_policy(client, work.num_tokens)
        while self._is_full(work.num_tokens):
            self._make_room_for(client, work.num_tokens)
        queue = self._queues.setdefault(client, collections.deque())
        if not queue:  # returning from idle: no credit for the time away
            self._vtime[client] = max(self._vtime[client], self._min_active_vtime())
        future: asyncio.Future[ScoreResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(client, work, future, now, None if timeout_s is None else now + timeout_s)
        if self._within_share(client, work.num_tokens, now):
            self._express.append(pending)
            self._express_tokens += work.num_tokens
            self._express_held[client] += work.num_tokens
            self._express_wakeup.set()
        else:
            queue.append(pending)
            self._wakeup.set()
        self._queued_requests += 1
        self._queued_tokens += work.num_tokens
        self._held_tokens[client] += work.num_tokens
        self._metrics.queue_depth.set(self._queued_requests)
        return future

    def _within_share(self, client: str, num_tokens: int, now: float) -> bool:
        """Express lane: the clients' offered tokens/s together exceed what the engine delivers (someone is
        held back), this client's are at most `express_max_share` of its max-min fair share, it has at most
        about one request in the fair queue, and its requests in the express lane stay within its weighted
        share of one batch (so a light client whose previous request is still running is not sent behind a
        bulk batch; one that bursts is). Clients that together just saturate the engine (each offering what
        it is served) stay in the fair queue's full batches."""
        express_held = self._express_held[client]
        if (
            not self._cfg.express_lane
            or self._held_tokens[client] - express_held > num_tokens
            or self._express_tokens >= self._cfg.max_batch_tokens
        ):
            return False
        demands = self._rates.active(now)
        weights = {c: self._weight.get(c, 1.0) for c in demands}
        level = fair_level(demands, weights, self._throughput.tokens_per_s)
        if level == math.inf or demands[client] > self._cfg.express_max_share * weights[client] * level:
            return False
        batch_share = self._cfg.max_batch_tokens * weights[client] / sum(weights.values())
        return express_held == 0 or express_held + num_tokens <= batch_share

    def _apply_policy(self, client: str, num_tokens: int) -> None:
        """Take the team's current weight; refuse the request when it would pass one of the team's caps."""
        policy = self._policy_of(client)
        self._note_weight(client, policy.weight)
        held_tokens = self._held_tokens[client]
        held_requests = len(self._queues.get(client, ())) + (1 if self._express_held[client] else 0)
        if policy.max_queued_tokens is not None and num_tokens > policy.max_queued_tokens:
            raise InvalidRequest(
                f"a request of {num_tokens} tokens can never fit team {client!r}'s max_queued_tokens "
                f"{policy.max_queued_tokens}: send shorter sequences or raise the cap in the teacher's tokens file"
            )
        excess = 0.0
        if policy.max_queued_tokens is not None and held_tokens + num_tokens > policy.max_queued_tokens:
            cap, excess = (
                f"max_queued_tokens {policy.max_queued_tokens}",
                held_tokens + num_tokens - policy.max_queued_tokens,
            )
        elif policy.max_queued_requests is not None and held_requests + 1 > policy.max_queued_requests:
            cap, excess = f"max_queued_requests {policy.max_queued_requests}", held_tokens / max(held_requests, 1)
        if excess:
            retry = self._team_retry_hint_s(client, excess)
            raise QueueFull(
                f"team {client!r} has {held_requests} requests ({held_tokens} tokens) queued, its cap is {cap} "
                f"(the teacher's tokens file); retry in {retry:.2f} s",
                retry_after_s=retry,
            )

    def _note_weight(self, client: str, weight: float) -> float:
        if self._weight.get(client) != weight:
            self._weight[client] = weight
            self._metrics.client_weight.labels(client).set(weight)
        return weight

    def _team_retry_hint_s(self, client: str, excess_tokens: float) -> float:
        """Time for the team's queue to shrink by `excess_tokens` at its weighted share of the engine."""
        active = {c for c, q in self._queues.items() if q} | {client}
        share = self._weight[client] / sum(self._weight.get(c, 1.0) for c in active)
        seconds = excess_tokens / (self._throughput.tokens_per_s * share)
        return round(min(30.0, max(0.05, seconds)), 3)

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
        client holding the most queued tokens per unit of weight, when that client would still hold more than the
        requester after the swap; the evicted request is answered RESOURCE_EXHAUSTED with the
        retry hint, exactly as a refusal at intake. Raises QueueFull when no such client exists.
        """
        held = {c: self._held_tokens[c] / self._weight.get(c, 1.0) for c, q in self._queues.items() if q}
        mine = (self._held_tokens[client] + num_tokens) / self._weight.get(client, 1.0)
        heaviest = max(held, key=held.__getitem__, default=None)
        if heaviest is None or heaviest == client or held[heaviest] <= mine:
            raise self._queue_full()
        victim = self._queues[heaviest].pop()
        self._queued_requests -= 1
        self._queued_tokens -= victim.work.num_tokens
        self._held_tokens[heaviest] -= victim.work.num_tokens
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
        self._express_task = asyncio.create_task(self._run_express(), name="teacher-express-lane")

    @property
    def _bulk_queued(self) -> int:
        return self._queued_requests - len(self._express)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._bulk_budget is not None:
                while self._bulk_in_engine >= self._bulk_budget:
                    self._room.clear()
                    await self._room.wait()
                room = self._bulk_budget - self._bulk_in_engine
            else:
                await self._slots.acquire()
                bulk_tokens = self._queued_tokens - self._express_tokens
                if self._cfg.batch_wait_ms and bulk_tokens < self._cfg.max_batch_tokens and self._inflight:
                    await asyncio.sleep(self._cfg.batch_wait_ms / 1000)
                room = self._cfg.max_batch_tokens
            batch = self._take_batch(min(room, self._cfg.max_batch_tokens))
            if not self._bulk_queued:
                self._wakeup.clear()
            if not batch:
                if self._bulk_budget is None:
                    self._slots.release()
                continue
            if self._bulk_budget is not None:
                self._bulk_in_engine += sum(p.work.num_tokens for p in batch)
            task = asyncio.create_task(self._run_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run_express(self) -> None:
        """Each express batch as soon as there is work; on an engine without `concurrent_express` one at a time
        (what arrived meanwhile goes next), else without waiting for the previous one."""
        while True:
            await self._express_wakeup.wait()
            batch = self._take_express()
            if not self._express:
                self._express_wakeup.clear()
            if batch:
                task = asyncio.create_task(self._run_batch(batch, express=True))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                if not self._engine.concurrent_express:
                    await asyncio.wait([task])

    def _take_express(self) -> list[_Pending]:
        batch: list[_Pending] = []
        tokens, now = 0, time.monotonic()
        while self._express and len(batch) < self._cfg.max_batch_requests:
            head = self._express[0]
            if batch and tokens + head.work.num_tokens > self._cfg.max_batch_tokens:
                break
            self._express.popleft()
            self._express_tokens -= head.work.num_tokens
            self._express_held[head.client] -= head.work.num_tokens
            self._unqueue(head)
            if self._dispatchable(head, now):
                self._metrics.express_requests.labels(head.client).inc()
                batch.append(head)
                tokens += head.work.num_tokens
        self._metrics.queue_depth.set(self._queued_requests)
        return batch

    def _dispatchable(self, item: _Pending, now: float) -> bool:
        """False for work whose caller went away or whose deadline passed (answered here); else account it."""
        if item.future.done():  # cancelled by its caller
            return False
        if item.deadline is not None and now >= item.deadline:
            item.future.set_exception(DeadlineExpired("deadline passed while queued; the work was dropped"))
            return False
        # the weight as the tokens file says now: an edit applies from the next dispatch on
        weight = self._note_weight(item.client, self._policy_of(item.client).weight)
        self._vtime[item.client] += item.work.num_tokens / weight
        self._metrics.queue_wait.labels(item.client).observe(now - item.enqueued_at)
        return True

    def _take_batch(self, max_tokens: int) -> list[_Pending]:
        """The next bulk batch in fair order: up to `max_tokens` tokens (at least one request)."""
        batch: list[_Pending] = []
        tokens = 0
        now = time.monotonic()
        while self._bulk_queued and len(batch) < self._cfg.max_batch_requests:
            client = min((c for c, q in self._queues.items() if q), key=self._vtime.__getitem__)
            head = self._queues[client][0]
            if batch and tokens + head.work.num_tokens > max_tokens:
                break
            self._unqueue(self._queues[client].popleft())
            if self._dispatchable(head, now):
                batch.append(head)
                tokens += head.work.num_tokens
        self._metrics.queue_depth.set(self._queued_requests)
        return batch

    def _unqueue(self, item: _Pending) -> None:
        self._queued_requests -= 1
        self._queued_tokens -= item.work.num_tokens
        self._held_tokens[item.client] -= item.work.num_tokens

    async def _run_batch(self, batch: list[_Pending], express: bool = False) -> None:
        started = time.monotonic()
        num_tokens = sum(p.work.num_tokens for p in batch)
        self._throughput.started(started)
        self._running_requests += len(batch)
        self._metrics.inflight_batches.inc()
        self._metrics.batch_requests.observe(len(batch))
        self._metrics.batch_tokens.observe(num_tokens)
        try:
            if self._bulk_budget is not None:  # request by request: each frees its room in the engine when answered
                await asyncio.gather(*(self._run_one(p, express) for p in batch))
                results = None
            else:
                works = [p.work for p in batch]
                results = await (
                    self._engine.score_batch_express(works) if express else self._engine.score_batch(works)
                )
        except Exception as exc:  # the engine failed: every request in the batch gets the error
            log.exception("engine failed on a batch of %d requests", len(batch))
            results = [EngineFailed(f"teacher engine error: {exc}")] * len(batch)
        finally:
            finished = time.monotonic()
            self._throughput.finished(num_tokens, finished)
            self._metrics.engine_busy.inc(finished - started)
            self._metrics.inflight_batches.dec()
            self._running_requests -= len(batch)
            self._export_yields()
            if not express and self._bulk_budget is None:
                self._slots.release()
        if results is not None:  # whole-batch engines; per-request ones were answered in `_run_one`
            for pending, result in zip(batch, results, strict=True):
                _resolve(pending, result)

    async def _run_one(self, pending: _Pending, express: bool) -> None:
        """One request of a batch on an engine that batches requests itself; answered as soon as it is scored."""
        try:
            run = self._engine.score_batch_express if express else self._engine.score_batch
            [result] = await run([pending.work])
        except Exception as exc:
            log.exception("engine failed on a request of %d tokens", pending.work.num_tokens)
            result = EngineFailed(f"teacher engine error: {exc}")
        finally:
            if not express:
                self._bulk_in_engine -= pending.work.num_tokens
                self._room.set()
        _resolve(pending, result)

    # -- helpers --------------------------------------------------------------------------

    def _export_yields(self) -> None:
        """Add what the engine's bulk batches gave way since the last batch to the metrics' counters."""
        now = self._engine.yield_stats()
        self._metrics.bulk_yields.inc(now.yields - self._yields_seen.yields)
        self._metrics.bulk_yield_seconds.inc(max(0.0, now.seconds - self._yields_seen.seconds))
        self._yields_seen = now

    def _min_active_vtime(self) -> float:
        active = [self._vtime[c] for c, q in self._queues.items() if q]
        return min(active) if active else max(self._vtime.values(), default=0.0)

    def _retry_hint_s(self) -> float:
        """Time the engine needs for what is queued, at its learned throughput."""
        return round(min(30.0, max(0.05, self._throughput.seconds_for(self._queued_tokens))), 3)

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
        for task in (self._loop_task, self._express_task):
            if task is not None:
                task.cancel()
        for queue in [*self._queues.values(), self._express]:
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(Draining("teacher shut down before this request ran"))
        self._queued_requests = self._queued_tokens = self._express_tokens = 0
        self._held_tokens.clear()
        self._express_held.clear()
