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
  teacher's top-k (`sampled_in_teacher_topk`). The formulas are the evaluation
  core's (`student_trainer.evaluation.teacher_diagnostics`, which `opd eval`
  uses too); this module only takes the trained rows of the step's tensors;
- `tool_stats`: the episodes with tool calls (worker's `meta.tool_calls`),
  their tool tokens (response mask 0) and turns (`meta.turns`).

Does not compute the loss or touch the model; log-probs are floored at the
evaluation core's floor (-100, the loss's default) so a probability-0 bucket
adds 0 to the entropy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from torch import Tensor

from protos.records import RolloutRecord
from student_trainer.evaluation import TEACHER_KEYS, TokenSums, teacher_diagnostics

__all__ = ["TEACHER_KEYS", "TokenSums", "record_teacher_sums", "reward_stats", "teacher_token_sums", "tool_stats"]


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
    valid_N = valid_N.bool()

    def rows(t: Tensor | None) -> np.ndarray | None:  # the valid rows, on the CPU (float64 keeps every value)
        if t is None:
            return None
        t = t[valid_N]
        return (t.double() if t.is_floating_point() else t.long()).cpu().numpy()

    has_topk = topk_ids_NK is not None and topk_ids_NK.shape[-1] > 0 and tail_logprobs_N is not None
    out = TokenSums()
    per_token = teacher_diagnostics(
        rows(target_ids_N),
        rows(token_logprobs_N),
        rows(topk_ids_NK) if has_topk else None,
        rows(topk_logprobs_NK) if has_topk else None,
        rows(tail_logprobs_N) if has_topk else None,
    )
    out.add_all(per_token)
    return out


def record_teacher_sums(record: RolloutRecord, scores) -> TokenSums:
    """The teacher diagnostics of one rollout's model-generated tokens; `scores` is the client's TeacherScores."""
    mask = np.asarray(record.response_mask).astype(bool)
    k = scores.topk_ids.shape[1] if getattr(scores, "topk_ids", None) is not None else 0
    topk = [np.asarray(a)[mask] for a in (scores.topk_ids, scores.topk_logprobs, scores.tail_logprobs)] if k else []
    out = TokenSums()
    sampled = np.asarray(record.response_ids)[mask]
    out.add_all(teacher_diagnostics(sampled, np.asarray(scores.token_logprobs)[mask], *topk))
    return out


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
