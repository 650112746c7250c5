"""Teacher scores fetched ahead of time, so the teacher's latency hides behind the student's compute.

Owns the queue of batches pulled but not yet trained: it keeps
`prefetch_depth` batches beyond the one about to train and requests their
teacher scores from the `ScoreSource` in order, as long as the replies held
for queued batches stay within `max_bytes` (full-vocabulary replies cost
4 * V bytes per token: 600 KB at V = 151,936). A batch that does not fit
waits, unrequested, until the batches before it have trained (backpressure);
the batch about to train is always requested, however large. It does not pull
rollouts (the trainer's `pull` does) or know where the scores come from (the
score source does).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from student_trainer.batching import Group
from student_trainer.score_source import ScoreSource


@dataclass
class Batch:
    """One step's data: every rank's groups, this rank's share, and its scores once requested."""

    groups: list[Group]  # the whole step (every rank's share)
    mine: list[Group]  # this rank's share
    weights: dict[str, float]  # rollout id -> staleness weight (absent: 1)
    dropped_stale: int = 0  # rollouts of the step dropped for staleness (the same on every rank)
    scores: Future | None = None  # {rollout_id: TeacherScores} of `mine`; None when `mine` is empty
    requested: bool = False  # scores asked of the source (or nothing to ask)

    def scored_tokens(self) -> int:
        return sum(len(r.response_ids) for g in self.mine for r in g)


class TeacherPrefetch:
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
