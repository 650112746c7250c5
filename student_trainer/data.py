"""The trainer's Redis side (rank 0): whole rollout groups in, prompts out, acks after commits.

Owns: reading `{ns}:rollouts` through the transport's rollout consumer
(`opd.stream_consumer.rollout_consumer`, which holds the entries and their
rollout ids until they are acknowledged, after the checkpoint that used them
is committed) and assembling complete groups (`group_size` records of one
`group_id`), separating eval rollouts from training ones, feeding the prompt
file(s) into `{ns}:prompts` with a bound on prompts in flight, and announcing
published weight versions. Its transport counters are `stats`. Runs on the
trainer's I/O loop; the training loop never touches Redis directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections import defaultdict
from collections.abc import Iterable

from opd.policy import announce_policy
from opd.prompts import load_prompts
from opd.stream_consumer import StreamConsumer, rollout_consumer
from opd.streams import PROMPT_GROUP, RedisRetry, StreamKeys, StreamProducer, StreamStats, connect
from protos.records import PolicyAnnouncement, PromptRecord, RolloutRecord
from student_trainer.config import TrainerConfig

log = logging.getLogger(__name__)
Group = list[RolloutRecord]


class RolloutSource:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.keys = StreamKeys(config.redis.namespace)
        self.redis = connect(config.redis)
        self.retry = RedisRetry(config.redis.retry_for_s)
        self.consumer: StreamConsumer[RolloutRecord] = rollout_consumer(
            self.redis, config.redis.namespace, f"trainer-{socket.gethostname()}", retry=self.retry
        )
        self._partial: dict[str, list[RolloutRecord]] = defaultdict(list)
        self._ready: list[Group] = []
        self.eval_records: list[RolloutRecord] = []

    @property
    def stats(self) -> StreamStats:
        """The transport's counters (dead letters, duplicates, retries, reclaims)."""
        return self.retry.stats

    def skip_used(self, rollout_ids: Iterable[str]) -> None:
        """Rollouts a committed checkpoint already used: skipped (and acked) if they are delivered again."""
        self.consumer.seen.update(rollout_ids)

    async def poll(self) -> None:
        """One read: complete groups go to the ready list, eval rollouts aside, the rest wait for their group."""
        for entry in await self.consumer.read(256, block_ms=self.config.batch.read_block_ms):
            record = entry.value
            if record.split == "eval":
                self.eval_records.append(record)
                continue
            members = self._partial[record.group_id]
            members.append(record)
            if len(members) >= record.group_size:
                self._ready.append(self._partial.pop(record.group_id))

    async def next_groups(self, n_groups: int) -> list[Group]:
        """Block until `n_groups` complete training groups arrived (in arrival order)."""
        while len(self._ready) < n_groups:
            await self.poll()
        taken, self._ready = self._ready[:n_groups], self._ready[n_groups:]
        return taken

    def take_eval(self, suffix: str) -> list[RolloutRecord]:
        """Remove and return the eval rollouts whose prompt id ends with `suffix`."""
        mine = [r for r in self.eval_records if r.prompt_id.endswith(suffix)]
        self.eval_records = [r for r in self.eval_records if not r.prompt_id.endswith(suffix)]
        return mine

    async def ack(self, rollout_ids: Iterable[str]) -> int:
        """Acknowledge the entries of these rollouts (after the checkpoint that used them is committed)."""
        return await self.consumer.ack_keys(rollout_ids)

    async def keepalive(self) -> None:
        """Keep the held rollouts (read, not yet committed) from being reclaimed."""
        await self.consumer.keepalive()

    async def announce(self, version: int, uri: str, step: int, created_at: float) -> bool:
        return await announce_policy(
            self.redis, self.keys, PolicyAnnouncement(version, uri, step, created_at), self.retry
        )

    async def close(self) -> None:
        await self.redis.aclose()


class PromptFeeder:
    """Feeds the prompt file into `{ns}:prompts` from position `start`, keeping at most `max_inflight` prompt
    groups between the feeder and the trainer (queued, being sampled, or sampled but not yet trained), so
    rollouts are not older than the staleness bound allows."""

    def __init__(self, source: RolloutSource, config: TrainerConfig, start: int = 0) -> None:
        self.position = start  # index of the next prompt to feed; a resumed trainer restores it
        # A group fed now is trained about inflight / groups_per_step steps later, plus the prefetch depth:
        # keep that under the staleness bound.
        batch = config.batch
        self.max_inflight = config.data.max_inflight_groups or batch.groups_per_step * max(
            1, batch.max_staleness - batch.prefetch_depth
        )
        self._producer = StreamProducer(source.redis, source.keys.prompts, PROMPT_GROUP, retry=source.retry)
        self._config = config
        self._keys = source.keys
        self._fed_this_run = 0
        self._consumed = 0
        self._room = asyncio.Event()

    def consumed(self, groups: int) -> None:
        """The trainer took `groups` training groups off the rollout stream (call on the I/O loop)."""
        self._consumed += groups
        self._room.set()

    def train_records(self) -> list[PromptRecord]:
        data = self._config.data
        return load_prompts(data.prompts, data.source) if data.prompts else []

    def eval_records(self) -> list[PromptRecord]:
        data = self._config.data
        if not data.eval_prompts:
            return []
        return load_prompts(
            data.eval_prompts, data.source.model_copy(update={"split": "eval", "epochs": 1, "shuffle": False})
        )

    async def feed_train(self, records: list[PromptRecord]) -> None:
        """Feed from `position` to the end (the records already hold every epoch); resumable by position."""
        while self.position < len(records):
            room = self.max_inflight - (self._fed_this_run - self._consumed)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            chunk = records[self.position : self.position + min(room, 16)]
            await self._producer.send_many([r.encode() for r in chunk])
            self.position += len(chunk)
            self._fed_this_run += len(chunk)
        log.info("prompt feeder: all %d prompts fed", len(records))

    async def feed_eval(self, records: list[PromptRecord], round_id: int) -> int:
        """Feed one eval round (ids suffixed with the round so each round is sampled afresh)."""
        tagged = [dataclasses.replace(r, prompt_id=f"{r.prompt_id}@eval{round_id}") for r in records]
        for i in range(0, len(tagged), 64):
            await self._producer.send_many([r.encode() for r in tagged[i : i + 64]])
        return sum(r.group_size for r in tagged)
