"""When the trainer's prompt feeder may feed one more training prompt: admission by policy version.

Owns the rule, as plain arithmetic (`Admission.room`), and what it reads (`oldest_live_version`). Feeding is the
feeder's (`feeder.py`); the staleness check at training time, the safety net, is the batch producer's.

**The rule** (`data.admission=version`, the default). A group is trained at most `max_staleness` versions after
the version it was sampled at. Say the trainer has done S steps, n groups fed by this run are not trained yet
(queued, being sampled, in, or pulled into the prefetch queue), G = `groups_per_step`, and the oldest version any
live rollout worker has loaded is v (each worker reports it in its heartbeat, `protos.heartbeat`). Groups are
trained about in the order they were fed, so the next group fed is trained by the step that starts with
S + floor(n / G) steps done, at the version published last by then: V(k) = floor((S + k) / p) * p with
k = floor(n / G) and p = `publish.every_steps` (versions are step numbers). Whichever worker takes it samples it
at v or later (a worker's loaded version only grows). Its lag is at most V(k) - v, so it is admitted only while

    V(floor(n / G)) - v <= max_staleness        (publishing every step: n < G * (max_staleness + 1 - (S - v)))

In steady state no group goes stale. What the rule assumes, and the safety net catches: groups finished far out of
order (a slow worker), a worker that starts behind and has not reported yet, a trainer restarted at an older step.
With no live worker reporting a version (older workers, heartbeats off) v = V(0): sampling at the current version,
as the older rule assumed. With `max_staleness` 0 it is the synchronous mode: G groups, fed only once every live
worker has loaded the trainer's current version, all trained by the next step (prefetch is capped at
`max_staleness`, `prefetch_depth`), so every group is on-policy and neither side waits for the other for
ever: the trainer waits for the groups, the workers for the version.

`data.admission=inflight` is the rule before it (for comparison, `opd bench pipeline`): at most
`groups_per_step * max(1, max_staleness - prefetch_depth)` groups fed and not yet pulled, whatever the workers'
versions. `data.max_inflight_groups`, when set, caps the groups fed and not yet pulled under either rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from opd.stream_heartbeat import live_versions
from opd.streams import PROMPT_GROUP, RedisRetry
from student_trainer.config import BatchConfig, TrainerConfig

Rule = Literal["version", "inflight"]


@dataclass(frozen=True)
class Admission:
    rule: Rule
    groups_per_step: int
    max_staleness: int
    prefetch_depth: int
    max_inflight: int | None = None  # data.max_inflight_groups
    publish_every: int = 1  # publish.every_steps

    @classmethod
    def from_config(cls, config: TrainerConfig) -> Admission:
        batch, data = config.batch, config.data
        depth = prefetch_depth(batch)
        every = config.publish.every_steps
        return cls(data.admission, batch.groups_per_step, batch.max_staleness, depth, data.max_inflight_groups, every)

    def inflight_bound(self) -> int:
        """The older rule's bound on groups fed and not yet pulled."""
        return self.max_inflight or self.groups_per_step * max(1, self.max_staleness - self.prefetch_depth)

    def untrained_bound(self, trainer_step: int, oldest_version: int | None) -> int:
        """The version rule's bound on groups fed and not yet trained (0: wait for the workers)."""

        def version_at(k: int) -> int:  # the version the step after `trainer_step + k` steps trains at
            return (trainer_step + k) // self.publish_every * self.publish_every

        # a worker ahead of the trainer (resumed from an older checkpoint) counts as current, no more
        oldest = version_at(0) if oldest_version is None else min(oldest_version, version_at(0))
        steps = 0  # steps ahead whose groups would be trained within the bound (version_at grows: it ends)
        while version_at(steps) - oldest <= self.max_staleness:
            steps += 1
        return self.groups_per_step * steps

    def room(self, *, untrained: int, inflight: int, trainer_step: int, oldest_version: int | None) -> int:
        """How many more groups may be fed now (never negative). `untrained`: fed by this run, not trained yet;
        `inflight`: fed, not yet pulled by the trainer."""
        if self.rule == "inflight":
            return max(0, self.inflight_bound() - inflight)
        room = self.untrained_bound(trainer_step, oldest_version) - untrained
        if self.max_inflight is not None:
            room = min(room, self.max_inflight - inflight)
        return max(0, room)


def prefetch_depth(config: BatchConfig) -> int:
    """The prefetch depth used: `batch.prefetch_depth`, but at most `batch.max_staleness` under the drop policy. A
    batch pulled d steps before it trains holds groups sampled at or before the version of the pull, d versions
    behind the training one: with d > max_staleness every prefetched group would be dropped (and with
    max_staleness 0, the synchronous mode, the trainer would wait for groups the feeder only admits after the
    step)."""
    if config.stale_policy == "drop":
        return min(config.prefetch_depth, config.max_staleness)
    return config.prefetch_depth


async def oldest_live_version(redis: aioredis.Redis, retry: RedisRetry, prompts_stream: str) -> int | None:
    """The oldest policy version a live rollout worker reports having loaded (None: no live worker reports one)."""
    versions = [v for v in (await live_versions(redis, retry, prompts_stream, PROMPT_GROUP)).values() if v is not None]
    return min(versions) if versions else None
