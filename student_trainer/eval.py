"""Evaluation rounds on held-out prompts: fed through the same prompt stream, never trained on.

Every `eval.every_steps` steps rank 0 feeds the eval prompts (ids tagged with
the round), the rollout workers sample them as usual, and when the round's
rollouts are in, their teacher scores are fetched and the round is reported:
pass@1 (share of samples with reward > 0), mean reward (mean@k over the
group), and the per-token sampled reverse KL to the teacher,
mean(log p_S(y) - log p_T(y)) with the student's log-probs taken at sampling
time (the behaviour log-probs; exact for sampling temperature 1).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future

import numpy as np

from protos.records import RolloutRecord

log = logging.getLogger(__name__)


def eval_report(records: list[RolloutRecord], scores: dict) -> dict[str, float]:
    rewards = [r.reward for r in records if r.reward is not None]
    diffs = []
    for r in records:
        mask = r.response_mask.astype(bool)
        diffs.append((r.behaviour_logprobs[mask] - scores[r.rollout_id].token_logprobs[mask]).astype(np.float64))
    tokens = np.concatenate(diffs) if diffs else np.zeros(0)
    return {"samples": float(len(records)),
            "pass_at_1": float(np.mean([x > 0 for x in rewards])) if rewards else math.nan,
            "mean_reward": float(np.mean(rewards)) if rewards else math.nan,
            "divergence": float(tokens.mean()) if tokens.size else math.nan,
            "tokens": float(tokens.size)}


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
