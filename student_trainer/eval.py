"""Evaluation rounds on held-out prompts: fed through the same prompt stream, never trained on.

Every `eval.every_steps` steps rank 0 feeds the eval prompts (ids tagged with
the round), the rollout workers sample them as usual, and when the round's
rollouts are in, their teacher scores are fetched and the round is reported:
pass@1 (share of samples with reward > 0), mean reward (mean@k over the
group), and the per-token sampled reverse KL to the teacher,
mean(log p_S(y) - log p_T(y)) with the student's log-probs taken at sampling
time (the behaviour log-probs; exact for sampling temperature 1).

Owns `EvalRounds` (rank 0): the rounds in flight, what they need passed in
(the eval prompt feeder, the rollout source, the score source), the report,
and `evals.jsonl` beside the checkpoints. The rollouts of a round are handed
to `mark_used` (acknowledged with the next committed checkpoint) and the
report to `report` (the trainer's status page, metrics and step log).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from opd.loop_thread import LoopThread
from protos.records import PromptRecord, RolloutRecord
from student_trainer.data import PromptFeeder, RolloutSource
from student_trainer.score_source import ScoreSource

log = logging.getLogger(__name__)


def eval_report(records: list[RolloutRecord], scores: dict) -> dict[str, float]:
    """pass@1, mean reward and the per-token sampled reverse KL of one round's rollouts."""
    rewards = [r.reward for r in records if r.reward is not None]
    diffs = []
    for r in records:
        mask = r.response_mask.astype(bool)
        diffs.append((r.behaviour_logprobs[mask] - scores[r.rollout_id].token_logprobs[mask]).astype(np.float64))
    tokens = np.concatenate(diffs) if diffs else np.zeros(0)
    return {
        "samples": float(len(records)),
        "pass_at_1": float(np.mean([x > 0 for x in rewards])) if rewards else math.nan,
        "mean_reward": float(np.mean(rewards)) if rewards else math.nan,
        "divergence": float(tokens.mean()) if tokens.size else math.nan,
        "tokens": float(tokens.size),
    }


class EvalRound:
    """One round in flight: which rollouts to wait for, then their teacher scores."""

    def __init__(self, round_id: int, step: int, expected: int) -> None:
        self.round_id, self.step, self.expected = round_id, step, expected
        self.records: list[RolloutRecord] = []
        self.scores: Future | None = None

    @property
    def suffix(self) -> str:
        return f"@eval{self.round_id}"

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.expected


class EvalRounds:
    """Rank 0's eval rounds: feed the eval prompts, collect the round's rollouts, score them, report."""

    def __init__(
        self,
        io: LoopThread,
        feeder: PromptFeeder,
        source: RolloutSource,
        scores: ScoreSource,
        prompts: list[PromptRecord],
        run_dir: str | Path,
        *,
        mark_used: Callable[[Iterable[str]], None],
        report: Callable[[int, dict[str, float]], None],
    ) -> None:
        self._io, self._feeder, self._source, self._scores = io, feeder, source, scores
        self._prompts, self._path = prompts, Path(run_dir) / "evals.jsonl"
        self._mark_used, self._report = mark_used, report
        self.rounds: list[EvalRound] = []

    def start(self, step: int) -> None:
        """Feed a round of the eval prompts for the policy at `step` (round id = step)."""
        expected = self._io.call(self._feeder.feed_eval(self._prompts, step))
        self.rounds.append(EvalRound(step, step, expected))

    def progress(self) -> None:
        """Take the rollouts that arrived; score complete rounds; report the rounds whose scores are in."""
        for rnd in list(self.rounds):
            rnd.records += self._source.take_eval(rnd.suffix)
            if rnd.complete and rnd.scores is None:
                rnd.scores = self._scores.fetch(rnd.records)
                self._mark_used(r.rollout_id for r in rnd.records)
            if rnd.scores is not None and rnd.scores.done():
                report = {"step": rnd.step, **eval_report(rnd.records, rnd.scores.result())}
                self._write(report, rnd.records)
                self._report(rnd.step, report)
                log.info("eval @ step %d: %s", rnd.step, {k: round(v, 4) for k, v in report.items()})
                self.rounds.remove(rnd)

    def finish(self, timeout_s: float) -> None:
        """After the last step: wait (up to `timeout_s`) for the rounds still in flight, then report them."""
        deadline = time.monotonic() + timeout_s
        while self.rounds and time.monotonic() < deadline:
            self._io.call(self._source.poll())
            self.progress()
        for rnd in self.rounds:
            log.warning(
                "eval round of step %d incomplete: %d of %d rollouts arrived", rnd.step, len(rnd.records), rnd.expected
            )

    def _write(self, report: dict, records: list[RolloutRecord]) -> None:
        """Append the round's report and its samples' policy versions to evals.jsonl."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if v == v else None) for k, v in report.items()}  # NaN -> null
        with self._path.open("a") as f:
            f.write(
                json.dumps(
                    {**finite, "time": time.time(), "policy_versions": sorted({r.policy_version for r in records})}
                )
                + "\n"
            )
