"""Per-step and per-eval-round diagnostics that are not the loss: rewards, the teacher's tokens, tool episodes.

Owns three reductions, each to plain sums that add up over micro-batches and
ranks (`TokenSums`) or to numbers of the step's records:

- `reward_stats`: samples with a reward and without one (a reward that timed
  out or raised, or a prompt without a reference answer: None in the record,
  left out of every reward-based term) and the pass rate over the scored ones;
- `teacher_token_sums`: from the teacher's reply for the trained tokens, without
  any `[tokens, vocab]` tensor: the teacher's entropy over the k + 1 outcomes
  of its reply (top-k ids and the tail bucket; merging outcomes never raises
  an entropy, so this is a LOWER BOUND of the full entropy, hence the name
  `teacher_entropy_topk_tail`), the mean teacher probability of the sampled
  token (`teacher_p_sampled`), and the share of sampled tokens inside the
  teacher's top-k (`sampled_in_teacher_topk`). The names and formulas are
  those of `opd eval` (`opd_apps/eval/divergence.py`);
- `tool_stats`: the episodes with tool calls (worker's `meta.tool_calls`),
  their tool tokens (response mask 0) and turns (`meta.turns`).

Does not compute the loss or touch the model; log-probs are floored at the
loss's floor (-100) so a probability-0 bucket adds 0 to the entropy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from protos.records import RolloutRecord

FLOOR = -100.0
TEACHER_KEYS = ("teacher_entropy_topk_tail", "teacher_p_sampled", "sampled_in_teacher_topk")


@dataclass
class TokenSums:
    """Sums and token counts of per-token diagnostics; `means()` gives the token-weighted means."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, values_N: Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values_N.double().sum().item())
        self.counts[name] = self.counts.get(name, 0.0) + float(values_N.numel())

    def merge(self, other: TokenSums) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0.0) + other.counts[name]

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / n for name, n in self.counts.items() if n}


def teacher_token_sums(
    token_logprobs_N: Tensor,
    target_ids_N: Tensor,
    valid_N: Tensor,
    topk_ids_NK: Tensor | None = None,
    topk_logprobs_NK: Tensor | None = None,
    tail_logprobs_N: Tensor | None = None,
) -> TokenSums:
    """The teacher diagnostics of the `valid_N` rows: log p_T of the sampled tokens [N], the sampled ids [N]
    and, when the teacher sent a top-k (k >= 1), its ids and log-probs [N, k] and tail log-mass [N]."""
    out = TokenSums()
    valid_N = valid_N.bool()
    out.add("teacher_p_sampled", token_logprobs_N[valid_N].double().exp())
    if topk_ids_NK is None or topk_ids_NK.shape[-1] == 0 or tail_logprobs_N is None:
        return out
    buckets_NB = torch.cat([topk_logprobs_NK[valid_N], tail_logprobs_N[valid_N][:, None]], dim=1)
    t_NB = buckets_NB.double().clamp(min=FLOOR)
    out.add("teacher_entropy_topk_tail", -(t_NB.exp() * t_NB).sum(dim=1))
    inside_N = (topk_ids_NK[valid_N].long() == target_ids_N[valid_N].long()[:, None]).any(dim=1)
    out.add("sampled_in_teacher_topk", inside_N.double())
    return out


def record_teacher_sums(record: RolloutRecord, scores) -> TokenSums:
    """`teacher_token_sums` of one rollout's model-generated tokens; `scores` is the client's TeacherScores."""
    k = scores.topk_ids.shape[1] if getattr(scores, "topk_ids", None) is not None else 0

    def tensor(array) -> Tensor:  # a copy: the client's arrays may be read-only views of the reply
        return torch.tensor(np.asarray(array))

    return teacher_token_sums(
        tensor(scores.token_logprobs),
        tensor(record.response_ids),
        tensor(record.response_mask),
        tensor(scores.topk_ids) if k else None,
        tensor(scores.topk_logprobs) if k else None,
        tensor(scores.tail_logprobs) if k else None,
    )


def reward_stats(records: Iterable[RolloutRecord], threshold: float) -> dict[str, float]:
    """`rewards_missing` (reward None) and `rewards_scored` counts, and `pass_rate`: the share of scored samples
    with reward > `threshold` (NaN when none is scored)."""
    rewards = [r.reward for r in records]
    scored = [x for x in rewards if x is not None]
    return {
        "rewards_scored": float(len(scored)),
        "rewards_missing": float(len(rewards) - len(scored)),
        "pass_rate": sum(x > threshold for x in scored) / len(scored) if scored else math.nan,
    }


def tool_stats(records: Iterable[RolloutRecord]) -> dict[str, float]:
    """Episodes with at least one tool call (`tool_episodes`), their tool tokens (response mask 0;
    `tool_tokens`, total) and the mean of their turns (`tool_turns_mean`, NaN without tool episodes)."""
    episodes = [r for r in records if int(r.meta.get("tool_calls", 0) or 0) > 0]
    tokens = sum(r.num_response_tokens - r.num_generated_tokens for r in episodes)
    turns = [int(r.meta.get("turns", 0) or 0) for r in episodes]
    return {
        "tool_episodes": float(len(episodes)),
        "tool_tokens": float(tokens),
        "tool_turns_mean": sum(turns) / len(turns) if turns else math.nan,
    }
