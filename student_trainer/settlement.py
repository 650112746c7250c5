"""What a trained step leaves behind outside the model: the rollouts it used, its prompts, its line in steps.jsonl.

`Settlement` is where the side effects of a step are applied, from what the step returned (`ReadyBatch` +
`StepReport`), in the order exactly-once needs (`Trainer._finish` calls them in that order):

1. `settle`: the step's samples are listed as used (acknowledged only after the next committed checkpoint, and
   listed in it, so a resumed run skips them if delivered again); rank 0 acknowledges the groups dropped as stale
   at once and tells the prompt feeder which prompts were trained and which went stale (fed again, or lost, with
   a line in `prompts.jsonl`: the feeder's);
2. `announce`: a published version on `{ns}:policy` (rank 0);
3. `checkpoint_state` / `committed`: what a checkpoint keeps of the run (the samples used since the last one, the
   feeder's position and ledger) and, once it is committed, the acknowledgement of those samples on Redis;
4. `audit`: rank 0's line in `{checkpoint.dir}/steps.jsonl` (statistics, rollouts trained, their sample keys,
   the policy versions of the step's groups, the rollouts dropped as stale, the empty batches before it, the
   staleness of each rollout trained);
5. `keepalive`: rollouts held until the next commit must not be reclaimed meanwhile (rank 0).

Also `resume` (a checkpoint's used samples and feeder state back into the rollout source and the feeder) and
`mark_used` (an eval round's samples). Holds no model; every Redis call goes through the rollout source on the
trainer's I/O loop. The rollout source and the feeder are rank 0's; on the other ranks only the used samples
(for the checkpoint) are kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.loop_thread import LoopThread
from opd.stream_consumer import sample_key
from student_trainer.batches import ReadyBatch
from student_trainer.report import StepReport
from student_trainer.waits import Waiter

if TYPE_CHECKING:
    from student_trainer.groups.feeder import PromptFeeder
    from student_trainer.groups.source import RolloutSource
    from student_trainer.score_sources.offline import OfflineRolloutFeeder


class Settlement:
    def __init__(
        self,
        io: LoopThread,
        waiter: Waiter,
        run_dir: str | Path,
        source: RolloutSource | None = None,
        feeder: PromptFeeder | OfflineRolloutFeeder | None = None,
    ) -> None:
        """`source`: rank 0's `RolloutSource`; `feeder`: rank 0's prompt feeder when this run feeds prompts."""
        self.io, self.waiter, self.source, self.feeder = io, waiter, source, feeder
        self.steps_file = Path(run_dir) / "steps.jsonl"
        self._used_since_commit: list[str] = []  # sample keys (prompt id / sample index)
        self._feeder_state: dict = {"position": 0}  # kept for the checkpoint when this run feeds no prompts

    # -- resume and the checkpoint ----------------------------------------------------------------------------------

    def resume(self, state: dict[str, Any]) -> None:
        """A committed checkpoint's part: the feeder's position and ledger, and the samples it used (skipped if
        they are delivered again)."""
        self._feeder_state = state.get("feeder") or {"position": state["feeder_position"]}
        if self.feeder is not None:
            self.feeder.restore(self._feeder_state)
            self.feeder.trainer_step = state["step"]
        if self.source is not None:
            used = state.get("used_keys")
            self.source.skip_used(used if used is not None else map(key_of_rollout_id, state["used_ids"]))
        self._used_since_commit = []

    def checkpoint_state(self) -> dict[str, Any]:
        """What the next checkpoint keeps of the run besides the model: the feeder's state and the samples used."""
        feeder = self.io.call(self.feeder.snapshot()) if self.feeder is not None else self._feeder_state
        return {"feeder": feeder, "feeder_position": feeder["position"], "used_keys": self._used_since_commit}

    def committed(self) -> int:
        """The checkpoint holding the used samples is committed: rank 0 acknowledges them (the count acked)."""
        acked = 0
        if self.source is not None:  # committed: now the rollouts it used may leave the stream
            acked = self.waiter.result(
                self.io.submit(self.source.ack(self._used_since_commit)),
                f"Redis to acknowledge {len(self._used_since_commit)} rollouts",
                interruptible=False,
            )
        self._used_since_commit = []
        return acked

    # -- a step's effects -------------------------------------------------------------------------------------------

    def mark_used(self, keys: Iterable[str]) -> None:
        """Samples (`opd.stream_consumer.sample_key`) consumed, trained on by a step or scored by an eval round:
        acknowledged on Redis once the next checkpoint is committed, and listed in it so a resumed run skips
        them."""
        self._used_since_commit += list(keys)

    def settle(self, batch: ReadyBatch, step: int) -> None:
        """The step trained `batch` (`step`: steps done, this one included, or none counted for an empty batch): its
        samples used; (rank 0) stale groups acknowledged now, the feeder told the trainer's step (its admission
        counts from it) and which prompts were trained and which went stale (fed again when the trainer feeds)."""
        self.mark_used(sample_key(r) for g in batch.groups for r in g)
        if self.source is None:
            return
        if self.feeder is not None:
            self.feeder.trainer_step = step  # before on_trained wakes it
        if batch.stale:
            self.io.call(self.source.drop(batch.stale, forget=self.feeder is not None))
        if self.feeder is not None:
            self.io.call(self.feeder.on_trained(g[0].prompt_id for g in batch.groups))
            if batch.stale:
                self.io.call(self.feeder.on_stale(g[0].prompt_id for g in batch.stale))

    def announce(self, version: int, uri: str, step: int, kind: str = "full", base_id: str = "") -> None:
        """Rank 0: a published version, on `{ns}:policy` (`kind` full or lora; `base_id`: a LoRA version's base)."""
        if self.source is not None:
            self.io.call(self.source.announce(version, uri, step, time.time(), kind, base_id))

    def audit(self, batch: ReadyBatch, report: StepReport) -> None:
        """Rank 0 appends the step's statistics, the rollouts it trained (ids and sample keys), the policy versions
        of the step's groups and the rollouts dropped as stale to steps.jsonl."""
        if self.source is None:
            return
        self.steps_file.parent.mkdir(parents=True, exist_ok=True)
        line = {
            "step": report.step,
            "time": time.time(),
            "version": report.version,
            "stats": {k: (v if math.isfinite(v) else None) for k, v in report.stats().items()},
            "tokens_per_s": report.tokens_per_s,
            "rollouts": [r.rollout_id for g in batch.groups for r in g],
            "sample_keys": [sample_key(r) for g in batch.groups for r in g],
            "policy_versions": batch.policy_versions,
            "dropped_stale": report.dropped_stale,
            "empty_steps": report.empty_steps,
            "trained_staleness": [max(0, batch.version - r.policy_version) for g in batch.groups for r in g],
        }
        with self.steps_file.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def keepalive(self) -> None:
        """Rank 0: rollouts held until the next commit must not be reclaimed meanwhile."""
        if self.source is not None:
            self.io.call(self.source.keepalive())


def key_of_rollout_id(rollout_id: str) -> str:
    """The sample key of a worker-named rollout id `{prompt_id}@{entry}/{sample}` (checkpoints before sample keys
    listed rollout ids)."""
    head, _, index = rollout_id.rpartition("/")
    prompt_id = head.rpartition("@")[0] or head
    return f"{prompt_id}/{index}"
