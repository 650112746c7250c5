"""The trainer's Redis side (rank 0): whole rollout groups in, acks after commits, policy announcements out.

Owns: reading `{ns}:rollouts` through the transport's rollout consumer
(`opd.stream_consumer.rollout_consumer`: dedupe by (prompt id, sample index),
keeping the first; it holds the entries until they are acknowledged, after
the checkpoint that used them is committed), assembling complete groups
(`group_size` distinct samples of one prompt id, so samples of two copies of a
prompt fed twice complete one group, never two), separating eval rollouts from
training ones, refusing rollouts of this run's prompts that are no longer open
(its `Admission`, the prompt feeder, `accepts` them or not: a late copy of a
prompt already trained or lost is refused) and telling the admission which
prompts' groups a step took, and announcing published weight versions. Its transport counters are
`stats`. Feeding prompts is `student_trainer.groups.feeder`'s. Runs on the trainer's
I/O loop; the training loop never touches Redis directly.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

from opd.policy import announce_policy, read_policy
from opd.stream_consumer import SeenSet, StreamConsumer, rollout_consumer, sample_key
from opd.streams import PROMPT_GROUP, RedisRetry, StreamKeys, StreamProducer, StreamStats, connect, redis_address
from protos.records import PolicyAnnouncement, RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.groups import Group

log = logging.getLogger(__name__)


class Admission(Protocol):
    """Which training rollouts may join a group, and what becomes of the groups taken (the prompt feeder)."""

    def accepts(self, prompt_id: str) -> bool: ...

    async def on_taken(self, prompt_ids: Iterable[str]) -> None: ...

    def describe(self) -> str: ...


class _AcceptAll:
    """Without a prompt feeder: every rollout may join a group."""

    def accepts(self, prompt_id: str) -> bool:
        return True

    async def on_taken(self, prompt_ids: Iterable[str]) -> None:
        return None

    def describe(self) -> str:
        return ""


class RolloutSource:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.keys = StreamKeys(config.redis.namespace)
        self.redis = connect(config.redis)
        self.retry = RedisRetry(config.redis.retry_for_s, address=redis_address(config.redis.url))
        self.seen_keys = SeenSet()  # sample keys read or used before: the consumer acks and skips a copy
        self.consumer: StreamConsumer[RolloutRecord] = rollout_consumer(
            self.redis, config.redis.namespace, f"trainer-{socket.gethostname()}", seen=self.seen_keys, retry=self.retry
        )
        self.prompts = StreamProducer(self.redis, self.keys.prompts, PROMPT_GROUP, retry=self.retry)
        self._partial: dict[str, list[RolloutRecord]] = {}  # prompt id -> samples so far, one per sample index
        self._ready: list[Group] = []
        self._ready_ids: set[str] = set()
        self.eval_records: list[RolloutRecord] = []
        self._admission: Admission = _AcceptAll()

    def admit_with(self, admission: Admission) -> None:
        """Rank 0's runtime hands the prompt feeder over once both are built (each needs the other)."""
        self._admission = admission

    @property
    def stats(self) -> StreamStats:
        """The transport's counters (dead letters, duplicates, retries, reclaims)."""
        return self.retry.stats

    def skip_used(self, keys: Iterable[str]) -> None:
        """Samples (`sample_key`) a committed checkpoint already used: skipped (and acked) if delivered again."""
        self.seen_keys.update(keys)

    def is_used(self, key: str) -> bool:
        return key in self.seen_keys

    async def poll(self) -> None:
        """One read: complete groups go to the ready list, eval rollouts aside, the rest wait for their group."""
        refused: list[str] = []
        for entry in await self.consumer.read(256, block_ms=self.config.batch.read_block_ms):
            record = entry.value
            if record.split == "eval":
                self.eval_records.append(record)
                continue
            if not self._admission.accepts(record.prompt_id):
                refused.append(entry.entry_id)
                continue
            members = self._partial.setdefault(record.prompt_id, [])
            if members and record.group_id != members[0].group_id:  # a sample of another copy of the prompt
                record = dataclasses.replace(record, group_id=members[0].group_id)
            members.append(record)
            if len(members) >= record.group_size:
                self._ready.append(self._partial.pop(record.prompt_id))
                self._ready_ids.add(record.prompt_id)
        if refused:  # copies of prompts already trained or lost: never trained, gone at once
            self.stats.duplicates_skipped += len(refused)
            await self.consumer.ack(refused)

    async def next_groups(self, n_groups: int) -> list[Group]:
        """Block until `n_groups` complete training groups arrived (in arrival order); the admission learns their
        prompts were taken (no longer in flight, and a late copy of one is refused from now on)."""
        while len(self._ready) < n_groups:
            await self.poll()
        taken, self._ready = self._ready[:n_groups], self._ready[n_groups:]
        self._ready_ids.difference_update(g[0].prompt_id for g in taken)
        await self._admission.on_taken([g[0].prompt_id for g in taken])
        return taken

    def has_group(self, prompt_id: str) -> bool:
        """A whole group of this prompt is in, waiting to be taken by a step."""
        return prompt_id in self._ready_ids

    def waiting_for(self, n_groups: int) -> str:
        text = (
            f"rollouts ({len(self._ready)} of {n_groups} whole groups in, {len(self._partial)} groups partly in, "
            f"{len(self.consumer.held)} rollouts held)"
        )
        feeder = self._admission.describe()
        return f"{text}; {feeder}" if feeder else text

    def take_eval(self, accept: Callable[[str], bool]) -> list[RolloutRecord]:
        """Remove and return the eval rollouts whose prompt id `accept`s."""
        mine = [r for r in self.eval_records if accept(r.prompt_id)]
        self.eval_records = [r for r in self.eval_records if not accept(r.prompt_id)]
        return mine

    async def ack(self, keys: Iterable[str]) -> int:
        """Acknowledge the entries of these samples (after the checkpoint that used them is committed)."""
        return await self.consumer.ack_keys(keys)

    async def drop(self, groups: Iterable[Group], *, forget: bool) -> None:
        """Acknowledge groups that will not be trained (stale) now; with `forget`, a copy fed again is accepted."""
        keys = [sample_key(r) for g in groups for r in g]
        await self.consumer.ack_keys(keys)
        if forget:
            for key in keys:
                self.seen_keys.discard(key)

    async def discard_partial(self, prompt_id: str) -> None:
        """A lost prompt: acknowledge the samples of it that came in (they will never make a group)."""
        members = self._partial.pop(prompt_id, [])
        if members:
            await self.consumer.ack_keys(sample_key(r) for r in members)

    async def keepalive(self) -> None:
        """Keep the held rollouts (read, not yet committed) from being reclaimed."""
        await self.consumer.keepalive()

    async def announce(
        self, version: int, uri: str, step: int, created_at: float, kind: str = "full", base_id: str = ""
    ) -> bool:
        announcement = PolicyAnnouncement(version, uri, step, created_at, kind, base_id)
        return await announce_policy(self.redis, self.keys, announcement, self.retry)

    async def announced_version(self) -> int | None:
        """The version `{ns}:policy` announces now (None: none yet)."""
        announcement = await read_policy(self.redis, self.keys, self.retry)
        return None if announcement is None else announcement.version

    async def close(self) -> None:
        await self.redis.aclose()
