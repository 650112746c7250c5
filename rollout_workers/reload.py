"""Live weight reload: watch `{ns}:policy` and load each newer announced version into the engine.

Owns the watch loop: the `{ns}:policy:events` pub/sub channel is the fast
path, a periodic read of the `{ns}:policy` hash the safety net (a message
published while the subscription was down is not redelivered), and the hash is
always the source of truth. A version is loaded only if newer than the
engine's; a LoRA version (an adapter) only onto the base it was trained on; a
failed load (missing directory, shape mismatch) is logged and counted, the old
weights stay, and the next poll tries again. Loading itself is the backend's
job (engine_vllm / engine_hf).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from opd.policy import read_policy
from opd.retry import Backoff, retry_async
from opd.streams import RedisRetry, StreamKeys, is_retryable
from protos.base_identity import base_identity
from protos.records import PolicyAnnouncement
from rollout_workers.engine import BackendError, GenerationBackend, resolve_weights_dir
from rollout_workers.metrics import RolloutMetrics

log = logging.getLogger(__name__)
_RESUBSCRIBE_BACKOFF = Backoff(initial_s=0.1, max_s=5.0)


class PolicyWatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: StreamKeys,
        backend: GenerationBackend,
        *,
        metrics: RolloutMetrics | None = None,
        retry: RedisRetry | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.redis, self.keys, self.backend, self.poll_s = redis, keys, backend, poll_s
        self.metrics = metrics or RolloutMetrics()
        self.retry = retry or RedisRetry()
        self.metrics.policy_version.set(backend.policy_version)
        self._base_id: str | None = None  # this engine's base identity, once a LoRA version needed it
        self._failed_version: int | None = None  # log a failing version once, not on every poll

    async def check_once(self) -> bool:
        """Load the announced policy if it is newer than the engine's; True when weights changed."""
        announcement = await read_policy(self.redis, self.keys, self.retry)
        if announcement is None or announcement.version <= self.backend.policy_version:
            return False
        start = time.monotonic()
        try:
            await self._load(announcement)
        except BackendError as exc:
            self.metrics.weight_reloads.labels("failed").inc()
            level = logging.DEBUG if self._failed_version == announcement.version else logging.ERROR
            log.log(
                level,
                "policy v%d not loaded (retrying every %.0f s), still sampling v%d: %s",
                announcement.version,
                self.poll_s,
                self.backend.policy_version,
                exc,
            )
            self._failed_version = announcement.version
            return False
        self.metrics.weight_reloads.labels("ok").inc()
        self.metrics.weight_reload_latency.observe(time.monotonic() - start)
        self.metrics.policy_version.set(announcement.version)
        log.info("now sampling policy v%d (step %d) from %s", announcement.version, announcement.step, announcement.uri)
        return True

    async def _load(self, announcement: PolicyAnnouncement) -> None:
        """Full weights: the backend reloads them. LoRA: only the adapter, and only onto the base it was trained
        on (the announced base identity against this engine's `--model`, computed once)."""
        weights_dir = resolve_weights_dir(announcement.uri)
        if announcement.kind == "full":
            await self.backend.load_policy(weights_dir, announcement.version)
            return
        if self._base_id is None:
            try:
                self._base_id = await asyncio.to_thread(base_identity, self.backend.base_dir)
            except (OSError, ValueError) as exc:
                raise BackendError(f"cannot identify this worker's base model: {exc}") from exc
        if announcement.base_id != self._base_id:
            raise BackendError(
                f"policy v{announcement.version} is a LoRA adapter for base {announcement.base_id}, but this worker's "
                f"--model {self.backend.base_dir!r} is {self._base_id}: start the worker on the trainer's --model"
            )
        await self.backend.load_adapter(weights_dir, announcement.version)

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wait for announcements on the channel, checking the hash on each one and every `poll_s`."""
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.keys.policy_events)
            await self.check_once()  # anything announced before we subscribed
            while not stop.is_set():
                await pubsub.get_message(timeout=self.poll_s)  # a message or the poll interval, either way:
                if not stop.is_set():
                    await self.check_once()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set; a lost connection is re-established with backoff (`opd.retry`)."""

        async def watch() -> None:
            if not stop.is_set():
                await self._listen(stop)

        def note(attempt: int, exc: BaseException, delay_s: float) -> None:
            self.retry.note_retry(f"policy watch {self.keys.policy_events}", attempt, exc, delay_s)
            if attempt == 1 and not is_retryable(exc) and not is_retryable(exc.__cause__ or exc):
                log.warning("policy watcher failed with more than a lost connection", exc_info=exc)

        await retry_async(
            watch,
            # Any failure, not only a lost connection: the watcher must outlive Redis hiccups. Cancellation
            # (a BaseException) ends it.
            retryable=lambda exc: isinstance(exc, Exception),
            backoff=_RESUBSCRIBE_BACKOFF,
            max_attempts=None,
            on_retry=note,
        )
