"""Teacher scores fetched ahead of time, so the teacher's latency hides behind the student's compute.

Owns the queue of batches pulled but not yet trained: it keeps
`prefetch_depth` batches beyond the one about to train, each with the future
of its teacher scores already requested from the `ScoreSource`, and hands
them out in order. It does not pull rollouts (the trainer's `pull` does),
know where the scores come from (the score source does), or judge staleness
(the trainer does, when the batch is trained: a batch waiting here ages).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from student_trainer.batching import Group
from student_trainer.score_source import ScoreSource


@dataclass
class Batch:
    """One step's data: every rank's groups, this rank's share, and its scores once requested."""

    groups: list[Group]  # the whole step (every rank's share)
    mine: list[Group]  # this rank's share
    weights: dict[str, float] = field(default_factory=dict)  # rollout id -> staleness weight (absent: 1)
    dropped_stale: int = 0  # rollouts of the step dropped for staleness (the same on every rank)
    scores: Future | None = None  # {rollout_id: TeacherScores} of `mine`; None when `mine` is empty


class TeacherPrefetch:
    def __init__(self, scores: ScoreSource, depth: int) -> None:
        self.scores, self.depth = scores, depth
        self._pending: collections.deque[Batch] = collections.deque()

    def next(self, pull: Callable[[], Batch]) -> Batch:
        """The next batch to train; first tops the queue up to `depth` + 1 batches with their scores requested."""
        while len(self._pending) < self.depth + 1:
            batch = pull()
            records = [r for g in batch.mine for r in g]
            batch.scores = self.scores.fetch(records) if records else None
            self._pending.append(batch)
        return self._pending.popleft()
