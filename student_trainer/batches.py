"""The producer half of the training loop: ready batches, one per step, for the `Trainer` to train.

`BatchProducer.next(version, remaining)` returns one step's `ReadyBatch` (or None when the ranks agreed to stop):

- **consumes** whole rollout groups from the rollout source (rank 0 only: `groups.source.RolloutSource`,
  `batch.groups_per_step` per step, broadcast to every rank) and this rank's teacher scores from the score source
  (`score_sources`, a future per batch);
- **splits** each step's groups across the ranks, balanced by tokens (`batching.split_across_ranks`);
- **prefetches** teacher scores `batch.prefetch_depth` batches ahead (at most `max_staleness`: `prefetch_depth`;
  `TeacherPrefetch`), within `batch.prefetch_max_mib` of held replies, so the teacher's latency hides behind the
  student's compute;
- **waits for**, each logged every `wait_log_s` through `waits.Waiter`: rank 0, the rollouts (interruptible by a
  stop request); every rank, rank 0's broadcast, this batch's teacher scores (interruptible), and the other ranks
  at the step boundary (`agree_stop`: the step after a stop request on any rank trains nothing);
- **judges staleness** when the batch is about to train, against the version being trained (not the one it was
  pulled at): a group sampled more than `batch.max_staleness` versions before is dropped, or down-weighted
  (`stale_policy=downweight`).

It applies no side effect of its own: what it dropped, and the lags it saw, travel in the `ReadyBatch` to the
trainer, which settles them once the step ran (`Trainer._finish`). No model, no loss, no Redis call except
through the rollout source.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from opd.loop_thread import LoopThread
from student_trainer.batching import split_across_ranks
from student_trainer.config import BatchConfig
from student_trainer.groups import Group
from student_trainer.groups.admission import prefetch_depth
from student_trainer.model import DistInfo
from student_trainer.waits import StopRequested, Waiter, agree_stop, broadcast_flag

if TYPE_CHECKING:
    from student_trainer.groups.source import RolloutSource
    from student_trainer.score_sources.base import ScoreSource


@dataclass
class Batch:
    """One step's data as pulled: every rank's groups, this rank's share, and its scores once requested."""

    groups: list[Group]  # the whole step (every rank's share)
    mine: list[Group]  # this rank's share
    weights: dict[str, float]  # rollout id -> staleness weight (absent: 1)
    dropped_stale: int = 0  # rollouts of the step dropped for staleness (the same on every rank)
    scores: Future | None = None  # {rollout_id: TeacherScores} of `mine`; None when `mine` is empty
    requested: bool = False  # scores asked of the source (or nothing to ask)

    def scored_tokens(self) -> int:
        return sum(len(r.response_ids) for g in self.mine for r in g)


@dataclass
class ReadyBatch:
    """One step's data, ready to train: the groups kept after the staleness check, this rank's share of them, the
    staleness weights, this rank's teacher scores, and what the check saw (the same on every rank)."""

    groups: list[Group]  # trained, every rank's
    mine: list[Group]  # trained, this rank's share
    weights: dict[str, float]  # rollout id -> staleness weight (absent: 1)
    scores: dict  # rollout id -> teacher_server.client.TeacherScores, this rank's share
    stale: list[Group]  # dropped as stale (not trained)
    policy_versions: list[int]  # the policy versions of every group pulled for the step, dropped ones included
    lags: list[int]  # versions between sampling and this step, one per rollout pulled
    version: int = 0  # the policy version the batch is trained at (its staleness was judged against it)
    data_wait_s: float = 0.0
    teacher_wait_s: float = 0.0

    @property
    def dropped_stale(self) -> int:
        return sum(len(g) for g in self.stale)


class TeacherPrefetch:
    """The queue of batches pulled but not yet trained: it keeps `depth` batches beyond the one about to train and
    requests their teacher scores in order, as long as the replies held for queued batches stay within `max_bytes`
    (full-vocabulary replies cost 4 * V bytes per token: 600 KB at V = 151,936). A batch that does not fit waits,
    unrequested, until the batches before it have trained (backpressure); the batch about to train is always
    requested, however large."""

    def __init__(self, scores: ScoreSource, depth: int, max_bytes: int | None = None) -> None:
        self.scores, self.depth, self.max_bytes = scores, depth, max_bytes
        self._pending: collections.deque[Batch] = collections.deque()

    def next(self, pull: Callable[[], Batch], remaining: int | None = None) -> Batch:
        """The next batch to train; first tops the queue up to `depth` + 1 batches (at most the `remaining` steps
        of the run: a batch pulled beyond the last step would hold its groups, untrained, until the end) and
        requests the scores of as many as fit the byte cap, in order."""
        queued = self.depth + 1 if remaining is None else max(1, min(self.depth + 1, remaining))
        while len(self._pending) < queued:
            self._pending.append(pull())
        head = self._pending.popleft()
        self._request(head)  # the batch about to train: always
        self._request_within_cap()
        return head

    def held_bytes(self) -> int:
        """Estimated bytes of the replies requested for queued batches (not the one training)."""
        return sum(self._bytes(b) for b in self._pending if b.requested)

    def _request_within_cap(self) -> None:
        held = self.held_bytes()
        for batch in self._pending:
            if batch.requested:
                continue
            size = self._bytes(batch)
            if self.max_bytes is not None and held + size > self.max_bytes:
                return  # in order: the batches behind it wait too
            self._request(batch)
            held += size

    def _request(self, batch: Batch) -> None:
        if batch.requested:
            return
        records = [r for g in batch.mine for r in g]
        batch.scores = self.scores.fetch(records) if records else None
        batch.requested = True

    def _bytes(self, batch: Batch) -> int:
        per_token = getattr(self.scores, "bytes_per_token", None)
        return batch.scored_tokens() * (per_token() if per_token is not None else 0)


class BatchProducer:
    """Every rank's source of ready batches (see the module docstring); `source` on rank 0 only."""

    def __init__(
        self,
        config: BatchConfig,
        info: DistInfo,
        io: LoopThread,
        scores: ScoreSource,
        waiter: Waiter,
        source: RolloutSource | None = None,
    ) -> None:
        """`scores`: this rank's `ScoreSource`; `source`: rank 0's `RolloutSource`, None on the other ranks;
        `waiter`: the run's waiter (its stop signal ends the interruptible waits)."""
        assert (source is not None) == info.is_main, "rank 0, and only rank 0, reads the rollout stream"
        self.config, self.info, self.io, self.waiter, self.source = config, info, io, waiter, source
        self.prefetch = TeacherPrefetch(scores, prefetch_depth(config), max_bytes=int(config.prefetch_max_mib * 2**20))

    def next(self, version: int, remaining: int) -> ReadyBatch | None:
        """The batch the step training `version` trains; None (nothing pulled is trained) when the ranks agreed to
        stop. `remaining`: steps left in the run (no batch is pulled beyond them)."""
        t0 = time.perf_counter()
        try:
            batch = self.prefetch.next(self._pull, remaining)  # pull, split across ranks, prefetch
        except StopRequested:
            return None
        t1 = time.perf_counter()
        scores, interrupted = self._teacher_scores(batch)  # this batch's scores
        t2 = time.perf_counter()
        if agree_stop(interrupted or self.waiter.stop.is_set(), self.waiter, self.info.device):  # step boundary
            return None
        ready = self._judge_staleness(batch, scores, version)
        ready.data_wait_s, ready.teacher_wait_s = t1 - t0, t2 - t1
        return ready

    def _rollout_wait(self) -> str:
        """What rank 0 waits for while it waits for rollouts (the source adds its prompt feeder's state)."""
        assert self.source is not None, "only rank 0 waits for rollouts"
        return self.source.waiting_for(self.config.groups_per_step)

    # -- pull whole groups (rank 0), broadcast, split across ranks --------------------------------------------------

    def _pull(self) -> Batch:
        """Rank 0 waits for the groups (a stop request ends the wait), then every rank learns whether there are
        any (StopRequested on every rank if not) and gets them."""
        groups: list[Group] | None = None
        if self.source is not None:
            try:
                groups = self.waiter.result(
                    self.io.submit(self.source.next_groups(self.config.groups_per_step)), self._rollout_wait
                )
            except StopRequested:
                groups = None
        if not broadcast_flag(groups is not None, self.waiter, "rank 0 (rollouts, or an eval round)", self.info.device):
            raise StopRequested("stop requested while rank 0 waited for rollouts")
        box = [groups]
        dist.broadcast_object_list(box, src=0)
        pulled = box[0]
        assert pulled is not None, "every rank learnt above that rank 0 has groups"
        return Batch(pulled, split_across_ranks(pulled, self.info.world_size)[self.info.rank], weights={})

    # -- this rank's teacher scores ---------------------------------------------------------------------------------

    def _teacher_scores(self, batch: Batch) -> tuple[dict, bool]:
        """This rank's scores, and whether a stop request ended the wait for them."""
        if batch.scores is None:
            return {}, False
        records = sum(len(g) for g in batch.mine)
        try:
            return self.waiter.result(batch.scores, f"teacher scores of {records} rollouts"), False
        except StopRequested:
            return {}, True

    # -- staleness, judged when the batch is trained -----------------------------------------------------------------

    def _judge_staleness(self, batch: Batch, scores: dict, version: int) -> ReadyBatch:
        cfg = self.config
        stale: list[Group] = []
        lags: list[int] = []
        for group in batch.groups:
            lag = max(0, version - min(r.policy_version for r in group))
            lags += [lag] * len(group)
            if lag <= cfg.max_staleness:
                continue
            if cfg.stale_policy == "downweight":
                batch.weights.update({r.rollout_id: cfg.stale_weight ** (lag - cfg.max_staleness) for r in group})
            else:
                stale.append(group)
        dropped = {g[0].group_id for g in stale}  # by group id: this rank's share may hold parts of a split group
        batch.dropped_stale = sum(len(g) for g in stale)
        return ReadyBatch(
            groups=[g for g in batch.groups if g[0].group_id not in dropped],
            mine=[g for g in batch.mine if g[0].group_id not in dropped],
            weights=batch.weights,
            scores=scores,
            stale=stale,
            policy_versions=sorted({r.policy_version for g in batch.groups for r in g}),
            lags=lags,
            version=version,
        )
