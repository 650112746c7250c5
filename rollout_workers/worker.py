"""One rollout worker: prompts from `{ns}:prompts` in, groups of rollout records to `{ns}:rollouts` out.

Owns the worker loop (read prompts into free slots, sample each prompt's
group as a task, push the group and ack its prompt in one MULTI), the
per-group work (render the chat template, run `group_size` episodes
concurrently so the engine batches them, score rewards with a time limit,
build the records) and the process around it (`run_worker`: engine, Redis,
ops port, policy watcher, in-process prompt feeding, drain on SIGTERM).

Rollout ids are `{prompt_id}@{prompt_entry_id}/{sample}`: a prompt redone
after a crash yields the same ids, so the trainer's dedupe drops copies. A
prompt that cannot be rendered or is too long is dead-lettered; one whose
sampling failed stays pending and is retried (up to `max_deliveries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from opd.ops_app import OpsServer, create_ops_app, ops_auth
from opd.prompts import PromptSourceError, feed_prompts, load_prompts, render_prompt_ids
from opd.stream_consumer import Entry, StreamConsumer
from opd.streams import (
    PROMPT_GROUP,
    ROLLOUT_GROUP,
    RedisRetry,
    StreamKeys,
    StreamProducer,
    connect,
    redis_address,
    undelivered,
)
from protos.records import PromptRecord, RolloutRecord
from rollout_workers.config import RolloutConfig
from rollout_workers.engine import GenerationBackend, SampleParams, create_backend, sample_seed
from rollout_workers.episode import Episode, EpisodeLimits, run_episode
from rollout_workers.metrics import RolloutMetrics
from rollout_workers.prompt_sampling import sampling_for
from rollout_workers.reload import PolicyWatcher
from rollout_workers.rewards import RewardFn, load_reward
from rollout_workers.tools import Tool, ToolBox

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(
        self,
        config: RolloutConfig,
        backend: GenerationBackend,
        redis: aioredis.Redis,
        *,
        metrics: RolloutMetrics | None = None,
        reward_fn: RewardFn | None = None,
        toolbox: ToolBox | None = None,
    ) -> None:
        self.config, self.backend, self.redis = config, backend, redis
        self.metrics = metrics or RolloutMetrics()
        self.reward_fn, self.toolbox = reward_fn, toolbox
        self.keys = StreamKeys(config.redis.namespace)
        self.retry = RedisRetry(
            config.redis.retry_for_s, stats=self.metrics.stats, address=redis_address(config.redis.url)
        )
        q = config.queue
        self.prompts: StreamConsumer[PromptRecord] = StreamConsumer(
            redis,
            self.keys.prompts,
            PROMPT_GROUP,
            config.consumer_name(),
            decode=PromptRecord.decode,
            dead_stream=self.keys.dead,
            claim_idle_ms=int(q.claim_idle_s * 1000),
            max_deliveries=q.max_deliveries,
            retry=self.retry,
            heartbeat_ttl_ms=int(q.heartbeat_ttl_s * 1000) or None,
        )
        self.rollouts = StreamProducer(
            redis, self.keys.rollouts, ROLLOUT_GROUP, max_pending=q.max_pending_rollouts, retry=self.retry
        )
        self.limits = EpisodeLimits(
            config.tools.max_turns if toolbox else 1,
            config.sampling.max_response_tokens,
            config.tools.max_tool_response_tokens,
            config.tools.turn_prefix,
            config.tools.turn_suffix,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_tick = 0.0
        self.groups_done = 0

    async def run(self, stop: asyncio.Event) -> None:
        """0. heartbeat; 1. read prompts into free slots; 2. sample each group as a task; 3. on stop, drain
        in-flight groups, then stop the heartbeat (the prompts abandoned past the grace are taken over)."""
        heartbeat = None
        if self.config.queue.heartbeat_ttl_s:
            # with the loaded policy version: the trainer's feeder admits prompts by the oldest live worker's
            beat = self.prompts.heartbeat(version=lambda: self.backend.policy_version)
            await beat.beat()  # listed and alive before the first read: never judged dead while holding
            beating = asyncio.Event()
            heartbeat = (beating, asyncio.create_task(beat.run(beating), name="heartbeat"))
        try:
            await self._loop(stop)
        finally:
            if heartbeat is not None:
                heartbeat[0].set()
                await asyncio.wait([heartbeat[1]], timeout=10)

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._tick()
            free = self.config.queue.max_inflight_prompts - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            entries = await self.prompts.read(free, block_ms=self.config.queue.block_ms)
            for entry in entries:
                task = asyncio.create_task(self._process(entry), name=f"group-{entry.value.prompt_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self.metrics.inflight_prompts.set(len(self._tasks))
            if not entries and not self._tasks and self.config.exit_when_drained and await self.drained():
                log.info("prompt stream drained after %d groups: exiting", self.groups_done)
                break
        await self._drain()

    async def _tick(self) -> None:
        """Every claim_idle_s / 3: keep held prompts ours (a long group is not stolen) and export queue depths."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + min(10.0, self.config.queue.claim_idle_s / 3)
        await self.prompts.keepalive()
        for name, stream, group in (
            ("prompts", self.keys.prompts, PROMPT_GROUP),
            ("rollouts", self.keys.rollouts, ROLLOUT_GROUP),
        ):
            with contextlib.suppress(Exception):  # the group may not exist yet; depth is informational
                self.metrics.queue_depth.labels(name).set(await undelivered(self.redis, self.retry, stream, group))

    async def drained(self) -> bool:
        """No prompt undelivered or pending anywhere, and no feeder still adding prompts."""
        left = await undelivered(self.redis, self.retry, self.keys.prompts, PROMPT_GROUP)
        self.metrics.queue_depth.labels("prompts").set(left)

        async def pending_and_feeder() -> tuple[int, int]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xpending(self.keys.prompts, PROMPT_GROUP)
                pipe.exists(self.keys.feeder)
                summary, feeding = await pipe.execute()
            return int(summary["pending"]), int(feeding)

        pending, feeding = await self.retry.run(pending_and_feeder, f"XPENDING {self.keys.prompts}")
        return left == 0 and pending == 0 and not feeding

    async def _drain(self) -> None:
        if not self._tasks:
            return
        done, pending = await asyncio.wait(self._tasks, timeout=self.config.drain_grace_s)
        for task in pending:  # their prompts stay pending in Redis and are redone by another worker
            task.cancel()
        log.info("drained: %d groups finished, %d abandoned to other workers", len(done), len(pending))

    async def _process(self, entry: Entry[PromptRecord]) -> None:
        record, start = entry.value, time.monotonic()
        try:
            prompt_ids = self._render(record)
        except PromptSourceError as exc:
            self.metrics.prompts.labels("dead").inc()
            await self.prompts.dead_letter([(entry.entry_id, record.encode(), str(exc))])
            return
        try:
            episodes = await asyncio.gather(
                *(self._episode(record, prompt_ids, entry.entry_id, i) for i in range(record.group_size))
            )
            records = await self._records(entry, prompt_ids, episodes, time.monotonic() - start)
            await self.rollouts.send_many([r.encode() for r in records], then_ack=(self.prompts, [entry.entry_id]))
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad group must not stop the worker; the prompt is retried
            self.metrics.prompts.labels("failed").inc()
            self.prompts.release([entry.entry_id])  # stays pending: reclaimed after claim_idle_s
            log.exception("prompt %s failed; it stays pending and will be retried", record.prompt_id)
            return
        self._observe(records, episodes, time.monotonic() - start)

    def _render(self, record: PromptRecord) -> list[int]:
        tools = self._toolbox_for(record)
        prompt_ids = render_prompt_ids(
            self.backend.tokenizer,
            record,
            enable_thinking=self.config.enable_thinking,
            tools=tools.specs() if tools else None,
        )
        if len(prompt_ids) >= self.backend.max_model_len:
            raise PromptSourceError(
                f"prompt {record.prompt_id!r} has {len(prompt_ids)} tokens, not below "
                f"max_model_len {self.backend.max_model_len}; raise --engine-max-model-len"
            )
        return prompt_ids

    def _toolbox_for(self, record: PromptRecord) -> ToolBox | None:
        if self.toolbox is None or record.tools is None:
            return self.toolbox
        allowed: dict[str, Tool] = {name: tool for name, tool in self.toolbox.tools.items() if name in record.tools}
        return ToolBox(allowed, self.toolbox.timeout_s) if allowed else None

    async def _episode(self, record: PromptRecord, prompt_ids: list[int], entry_id: str, index: int) -> Episode:
        s = self.config.sampling
        p = sampling_for(record, s)  # an eval round's prompt may carry its own settings
        params = SampleParams(
            max_tokens=s.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=sample_seed(s.seed, record.prompt_id, index),
        )
        toolbox = self._toolbox_for(record)
        limits = self.limits if toolbox else EpisodeLimits(1, s.max_response_tokens)
        return await run_episode(
            self.backend, prompt_ids, params, request_id=f"{entry_id}/{index}", toolbox=toolbox, limits=limits
        )

    async def _reward(self, text: str, record: PromptRecord) -> tuple[float | None, str | None]:
        """(reward, why there is none): a reward that times out or raises is None, never 0 (the trainer leaves
        it out of every reward-based term), with the exception's type as the reason."""
        if self.reward_fn is None:
            return None, None
        try:
            reward = await asyncio.wait_for(
                asyncio.to_thread(self.reward_fn, text, record), self.config.reward.timeout_s
            )
            return (None, None) if reward is None else (float(reward), None)
        except Exception as exc:  # noqa: BLE001 - a reward failure costs the reward, not the rollout
            self.metrics.reward_failures.inc()
            log.warning("reward failed for %s: %s: %s", record.prompt_id, type(exc).__name__, exc)
            return None, type(exc).__name__

    async def _records(
        self, entry: Entry[PromptRecord], prompt_ids: list[int], episodes: list[Episode], latency_s: float
    ) -> list[RolloutRecord]:
        record, s = entry.value, self.config.sampling
        p = sampling_for(record, s)
        group_id = f"{record.prompt_id}@{entry.entry_id}"
        out = []
        for i, ep in enumerate(episodes):
            text = self.backend.tokenizer.decode(ep.response_ids, skip_special_tokens=True)
            meta: dict[str, Any] = {
                **ep.meta(),
                "worker": self.config.consumer_name(),
                "backend": self.backend.name,
                "sample_index": i,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "seed": sample_seed(s.seed, record.prompt_id, i),
                "latency_s": round(latency_s, 4),
            }
            if ep.tool_log:
                meta["tools"] = [name for name, _ in ep.tool_log]
            reward, reward_error = await self._reward(text, record)
            if reward_error is not None:  # timed out (TimeoutError) or raised: the reward is None, not 0
                meta["reward_error"] = reward_error
            out.append(
                RolloutRecord(
                    rollout_id=f"{group_id}/{i}",
                    prompt_id=record.prompt_id,
                    group_id=group_id,
                    group_size=record.group_size,
                    split=record.split,
                    prompt_ids=np.asarray(prompt_ids, np.int32),
                    response_ids=np.asarray(ep.response_ids, np.int32),
                    response_mask=np.asarray(ep.response_mask, np.uint8),
                    behaviour_logprobs=np.asarray(ep.logprobs, np.float32),
                    reward=reward,
                    policy_version=ep.policy_version,
                    meta=meta,
                    teacher=record.teacher,  # the prompt's domain picks the teacher that scores it
                    sampling_temperature=p.temperature,  # the trainer checks them against its loss
                    sampling_top_p=p.top_p,
                )
            )
        return out

    def _observe(self, records: list[RolloutRecord], episodes: list[Episode], latency_s: float) -> None:
        m = self.metrics
        self.groups_done += 1
        m.prompts.labels("done").inc()
        m.generation_latency.observe(latency_s)
        for r in records:
            m.rollouts.labels(r.split).inc()
            m.generated_tokens.inc(r.num_generated_tokens)
            m.tool_tokens.inc(r.num_response_tokens - r.num_generated_tokens)
            m.response_tokens.observe(r.num_response_tokens)
            if r.reward is not None:
                m.reward.observe(r.reward)
        for ep in episodes:
            for name, ok in ep.tool_log:
                known = self.toolbox is not None and name in self.toolbox.tools
                m.tool_calls.labels(name if known else "unknown", "ok" if ok else "error").inc()


async def feed_from_config(
    config: RolloutConfig, redis: aioredis.Redis, records: list[PromptRecord] | None = None
) -> int:
    """Feed `records` (default: `config.prompts` read with `config.dataset`) into `{ns}:prompts`, with
    backpressure at `queue.max_pending_prompts`."""
    keys = StreamKeys(config.redis.namespace)
    if records is None:
        if config.prompts is None:
            raise ValueError("no prompts to feed: give a prompt file (--prompts FILE) or the records")
        records = await asyncio.to_thread(load_prompts, config.prompts, config.dataset)
    producer = StreamProducer(
        redis,
        keys.prompts,
        PROMPT_GROUP,
        max_pending=config.queue.max_pending_prompts,
        retry=RedisRetry(config.redis.retry_for_s, address=redis_address(config.redis.url)),
    )
    sent = await feed_prompts(producer, records, feeder_key=keys.feeder)
    log.info(
        "fed %d prompts (%d samples each) from %s to %s", sent, config.dataset.n_samples, config.prompts, keys.prompts
    )
    return sent


async def run_worker(
    config: RolloutConfig,
    *,
    stop: asyncio.Event | None = None,
    backend: GenerationBackend | None = None,
    feed: list[PromptRecord] | None = None,
) -> RolloutWorker:
    """The whole worker process: engine, ops port, policy watcher, prompt feeder (when `feed` holds records),
    loop; returns when stopped or drained. `backend` may be passed in to share a loaded engine (tests); it is
    then not closed."""
    stop = stop or asyncio.Event()
    metrics = RolloutMetrics()
    redis = connect(config.redis)
    own_backend = backend is None
    backend = backend or await create_backend(config)
    metrics.engine_ready.set(1)
    toolbox = ToolBox.from_specs(config.tools.enabled, config.tools.timeout_s) if config.tools.enabled else None
    worker = RolloutWorker(
        config, backend, redis, metrics=metrics, reward_fn=load_reward(config.reward.function), toolbox=toolbox
    )
    ops = OpsServer.from_config(
        create_ops_app("rollout", metrics.registry, ready=lambda: not stop.is_set(), auth=ops_auth(config.ops)),
        config.ops,
        port=config.ops_port(),
    )
    await ops.start()
    watcher = PolicyWatcher(
        redis, worker.keys, backend, metrics=metrics, retry=worker.retry, poll_s=config.reload.poll_s
    )
    await watcher.check_once()  # never sample a stale policy that was announced before we started
    background: list[asyncio.Task[Any]] = [asyncio.create_task(watcher.run(stop))]
    if feed:
        await redis.set(worker.keys.feeder, "1", ex=30)  # before the loop can see an empty stream and exit
        background.append(asyncio.create_task(feed_from_config(config, redis, feed)))
    log.info(
        "worker %s (%s, policy v%d) reading %s, ops on port %d",
        config.consumer_name(),
        backend.name,
        backend.policy_version,
        worker.keys.prompts,
        ops.port,
    )
    try:
        await worker.run(stop)
    finally:
        stop.set()
        for task in background:  # the watcher also ends by itself within poll_s once stop is set
            task.cancel()
        await asyncio.wait(background, timeout=config.reload.poll_s + 5)
        await ops.stop()
        if own_backend:
            await backend.close()
        await redis.aclose()
    return worker


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set `stop` (main thread only; Ray actors and tests stop through the event)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
