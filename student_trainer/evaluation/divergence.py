"""Per-token divergences to the teacher and teacher-token diagnostics of sampled responses (numpy only).

For each response position p (the distribution of token p given tokens < p),
with the teacher's reply (`teacher_server.client.TeacherScores`: the sampled
token's log-prob t(y), the top-k ids and log-probs t_1..t_k, the tail
log-mass t_tail) and the student's log-probs:

- `sampled_reverse_kl`: max(s(y), f) - max(t(y), f), the sampled-token estimate
  of KL(p_S || p_T) (its mean is unbiased when y was sampled from p_S itself:
  temperature 1, top-p 1, top-k off). `opd eval` passes the student's
  teacher-forced log-probs, the trainer's eval rounds the behaviour log-probs
  taken at sampling time;
- `forward_kl_topk_tail`: KL(p_T || p_S) over k + 1 buckets, the teacher's top-k
  ids and one tail bucket for the rest of the vocabulary: sum_b q_b (t_b - s_b);
- `teacher_diagnostics`: `teacher_entropy_topk_tail`, -sum_b q_b t_b over the
  same k + 1 buckets, a LOWER BOUND of the teacher's full entropy (merging
  outcomes never raises it); `teacher_p_sampled`, exp t(y);
  `sampled_in_teacher_topk`, y among the top-k;
- `top1_agreement`: the student's argmax equals the teacher's top-1.

Log-probs are floored at f = `LOGPROB_FLOOR` (-100, the default of the
trainer's `loss.logprob_floor`) on both sides, so that a probability-0 bucket
keeps every value finite. These are the only implementations: the trainer's
step diagnostics and eval rounds, `opd eval` and the demo's report call them,
and reduce them with `TokenSums`, below. Does not run a model or call the
teacher.

`TokenSums` is the one accumulator of these per-token metrics, whose means
weigh every token the same: per metric, a float64 sum and a token count. They
add up over responses, micro-batches, eval rounds and ranks (`merge`, or the
raw `sums`/`counts` into an all-reduce), so a mean over many responses is the
mean over their tokens, never a mean of per-response means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOGPROB_FLOOR = -100.0  # = LossConfig.logprob_floor's default; a unit test holds them equal
TEACHER_KEYS = ("teacher_entropy_topk_tail", "teacher_p_sampled", "sampled_in_teacher_topk")

# metric name -> what the report says it is
METRICS: dict[str, str] = {
    "reverse_kl_sampled": "mean log p_S(y) - log p_T(y) over sampled tokens (estimate of KL(p_S||p_T))",
    "forward_kl_topk_tail": "mean KL(p_T||p_S) over the teacher's top-k + tail bucket",
    "teacher_entropy_topk_tail": "mean teacher entropy over top-k + tail (a lower bound of the full entropy)",
    "teacher_p_sampled": "mean teacher probability of the sampled token",
    "sampled_in_teacher_topk": "share of sampled tokens inside the teacher's top-k",
    "top1_agreement": "share of positions where the student's argmax is the teacher's top-1",
}
TOPK_METRICS = ("forward_kl_topk_tail", "teacher_entropy_topk_tail", "sampled_in_teacher_topk", "top1_agreement")


@dataclass
class StudentTokenStats:
    """The student's teacher-forced distribution (temperature 1) at P response positions."""

    token_logprobs: np.ndarray  # [P] log p_S of the token actually there
    topk_logprobs: np.ndarray  # [P, k] log p_S at the teacher's top-k ids (k may be 0)
    tail_logprobs: np.ndarray  # [P] log of the student's mass outside those ids, summed directly
    argmax_ids: np.ndarray  # [P] the student's most likely token


def floored(logprobs: Any) -> np.ndarray:
    """max(log-probs, LOGPROB_FLOOR) in float64 (-inf included)."""
    return np.maximum(np.asarray(logprobs, dtype=np.float64), LOGPROB_FLOOR)


def sampled_reverse_kl(student_logprobs_P: Any, teacher_logprobs_P: Any) -> np.ndarray:
    """[P] log p_S(y) - log p_T(y) of the sampled tokens, both floored: the sampled-token estimate of
    KL(p_S || p_T)."""
    return floored(student_logprobs_P) - floored(teacher_logprobs_P)


def _xlogx_terms(logprobs: np.ndarray) -> np.ndarray:
    """q * t with q = exp(t), floored: 0 where the probability is 0."""
    t = floored(logprobs)
    return np.exp(t) * t


def teacher_top1(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """The teacher's most likely token per position [P] (its top-k need not arrive sorted); needs k >= 1."""
    return topk_ids[np.arange(len(topk_ids)), np.argmax(topk_logprobs, axis=1)]


def top1_agreement(student_argmax: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """[P] bool: the student's argmax equals the teacher's top-1 (teacher forcing on the same sequence)."""
    if topk_ids.shape[1] == 0:
        raise ValueError("top-1 agreement needs the teacher's top-k with k >= 1")
    return np.asarray(student_argmax) == teacher_top1(topk_ids, topk_logprobs)


def teacher_diagnostics(
    sampled_ids_P: Any,
    token_logprobs_P: Any,
    topk_ids_PK: Any = None,
    topk_logprobs_PK: Any = None,
    tail_logprobs_P: Any = None,
) -> dict[str, np.ndarray]:
    """Per-token teacher diagnostics [P]: log p_T of the sampled tokens [P], the sampled ids [P] and, when the
    teacher sent a top-k (k >= 1), its ids and log-probs [P, k] and tail log-mass [P] (the top-k ones need them)."""
    out = {"teacher_p_sampled": np.exp(np.asarray(token_logprobs_P, dtype=np.float64))}
    if topk_ids_PK is None or np.shape(topk_ids_PK)[-1] == 0 or tail_logprobs_P is None:
        return out
    buckets_PB = np.concatenate(
        [np.asarray(topk_logprobs_PK, np.float64), np.asarray(tail_logprobs_P, np.float64)[:, None]], axis=1
    )
    out["teacher_entropy_topk_tail"] = -_xlogx_terms(buckets_PB).sum(axis=1)
    inside_P = (np.asarray(topk_ids_PK) == np.asarray(sampled_ids_P)[:, None]).any(axis=1)
    out["sampled_in_teacher_topk"] = inside_P.astype(np.float64)
    return out


def reply_diagnostics(sampled_ids_P: Any, teacher: Any) -> dict[str, np.ndarray]:
    """`teacher_diagnostics` of one reply (`TeacherScores`: token_logprobs, topk_ids, topk_logprobs,
    tail_logprobs) for the sampled ids [P]."""
    topk = getattr(teacher, "topk_ids", None)
    k = 0 if topk is None else np.shape(topk)[1]
    return teacher_diagnostics(
        sampled_ids_P,
        teacher.token_logprobs,
        topk if k else None,
        teacher.topk_logprobs if k else None,
        teacher.tail_logprobs if k else None,
    )


def divergences(student: StudentTokenStats, teacher: Any) -> dict[str, np.ndarray]:
    """Per-token divergences [P] of one response between the student and the teacher (TeacherScores)."""
    out = {"reverse_kl_sampled": sampled_reverse_kl(student.token_logprobs, teacher.token_logprobs)}
    if teacher.topk_ids.shape[1] > 0:
        t = floored(np.concatenate([teacher.topk_logprobs, teacher.tail_logprobs[:, None]], 1))
        s = floored(np.concatenate([student.topk_logprobs, student.tail_logprobs[:, None]], 1))
        out["forward_kl_topk_tail"] = (np.exp(t) * (t - s)).sum(axis=1)
        out["top1_agreement"] = top1_agreement(student.argmax_ids, teacher.topk_ids, teacher.topk_logprobs)
    return out


@dataclass
class TokenSums:
    """Sums and token counts of per-token metrics; `means()` gives the token-weighted means."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, values_N: Any) -> float | None:
        """Add the per-token values [N] (numpy, a list, or a CPU tensor) of metric `name`; returns their own
        mean (None when N = 0)."""
        values = np.asarray(values_N, dtype=np.float64).reshape(-1)
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.size)
        return float(values.mean()) if values.size else None

    def add_all(self, per_token: Mapping[str, Any]) -> dict[str, float | None]:
        """`add` every metric of one response; returns that response's own means (None for an empty one)."""
        return {name: self.add(name, values) for name, values in per_token.items()}

    def merge(self, other: TokenSums) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def mean(self, name: str, empty: float | None = None) -> float | None:
        """The token mean of `name`; `empty` when no token of it was added."""
        n = self.counts.get(name, 0)
        return self.sums[name] / n if n else empty

    def means(self, empty: float | None = None) -> dict[str, float | None]:
        """Every metric's token mean; `empty` for a metric added with no tokens."""
        return {name: self.mean(name, empty) for name in self.counts}

    @property
    def tokens(self) -> int:
        """Tokens of the metric seen most often (every metric of a full reply counts the same tokens)."""
        return max(self.counts.values(), default=0)
