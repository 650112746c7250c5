"""Per-token divergence to the teacher and teacher-token diagnostics of sampled responses (numpy only).

For each response position p (the distribution of token p given tokens < p),
with the teacher's reply (`teacher_server.client.TeacherScores`: the sampled
token's log-prob t(y), the top-k ids and log-probs t_1..t_k, the tail
log-mass t_tail) and the student's teacher-forced log-probs at temperature 1
(`StudentTokenStats`, from `opd_apps.eval.student`):

- `reverse_kl_sampled`: log p_S(y) - max(t(y), f), the sampled-token estimate
  of KL(p_S || p_T) (its mean is unbiased when y was sampled from p_S itself:
  temperature 1, top-p 1, top-k off);
- `forward_kl_topk_tail`: KL(p_T || p_S) over k + 1 buckets, the teacher's top-k
  ids and one tail bucket for the rest of the vocabulary: sum_b q_b (t_b - s_b);
- `teacher_entropy_topk_tail`: -sum_b q_b t_b over the same k + 1 buckets, a
  LOWER BOUND of the teacher's full entropy (merging outcomes never raises it);
- `teacher_p_sampled`: exp t(y); `sampled_in_teacher_topk`: y among the top-k;
- `top1_agreement`: the student's argmax equals the teacher's top-1.

Log-probs are floored at f = -100 on both sides, as the trainer's losses do
(`student_trainer.loss.divergences`), so that a probability-0 bucket keeps
every value finite. Means are over tokens (every sampled token of every
response weighs the same). Does not run a model or call the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FLOOR = -100.0

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


def _xlogx_terms(logprobs: np.ndarray) -> np.ndarray:
    """q * t with q = exp(t), floored: 0 where the probability is 0."""
    t = np.maximum(logprobs.astype(np.float64), FLOOR)
    return np.exp(t) * t


def teacher_top1(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """The teacher's most likely token per position [P] (its top-k need not arrive sorted); needs k >= 1."""
    return topk_ids[np.arange(len(topk_ids)), np.argmax(topk_logprobs, axis=1)]


def top1_agreement(student_argmax: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """[P] bool: the student's argmax equals the teacher's top-1 (teacher forcing on the same sequence)."""
    if topk_ids.shape[1] == 0:
        raise ValueError("top-1 agreement needs the teacher's top-k with k >= 1")
    return np.asarray(student_argmax) == teacher_top1(topk_ids, topk_logprobs)


def teacher_diagnostics(sampled_ids: np.ndarray, teacher) -> dict[str, np.ndarray]:
    """Per-token teacher diagnostics [P] of one response; `teacher` is a TeacherScores. Top-k ones need k >= 1."""
    out = {"teacher_p_sampled": np.exp(teacher.token_logprobs.astype(np.float64))}
    if teacher.topk_ids.shape[1] > 0:
        buckets = np.concatenate([teacher.topk_logprobs, teacher.tail_logprobs[:, None]], axis=1)
        out["teacher_entropy_topk_tail"] = -_xlogx_terms(buckets).sum(axis=1)
        out["sampled_in_teacher_topk"] = (teacher.topk_ids == np.asarray(sampled_ids)[:, None]).any(axis=1)
    return out


def divergences(student: StudentTokenStats, teacher) -> dict[str, np.ndarray]:
    """Per-token divergences [P] of one response between the student and the teacher (TeacherScores)."""
    s_y = np.maximum(student.token_logprobs.astype(np.float64), FLOOR)
    out = {"reverse_kl_sampled": s_y - np.maximum(teacher.token_logprobs.astype(np.float64), FLOOR)}
    if teacher.topk_ids.shape[1] > 0:
        t = np.maximum(
            np.concatenate([teacher.topk_logprobs, teacher.tail_logprobs[:, None]], 1).astype(np.float64), FLOOR
        )
        s = np.maximum(
            np.concatenate([student.topk_logprobs, student.tail_logprobs[:, None]], 1).astype(np.float64), FLOOR
        )
        out["forward_kl_topk_tail"] = (np.exp(t) * (t - s)).sum(axis=1)
        out["top1_agreement"] = top1_agreement(student.argmax_ids, teacher.topk_ids, teacher.topk_logprobs)
    return out


@dataclass
class TokenMeans:
    """Running sums of per-token metrics over many responses; `means()` gives the token-weighted means."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, per_token: dict[str, np.ndarray]) -> dict[str, float | None]:
        """Add one response's per-token arrays; returns that response's own means (None for an empty one)."""
        own: dict[str, float | None] = {}
        for name, values in per_token.items():
            values = np.asarray(values, dtype=np.float64)
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
            self.counts[name] = self.counts.get(name, 0) + int(values.size)
            own[name] = float(values.mean()) if values.size else None
        return own

    def means(self) -> dict[str, float | None]:
        return {name: (self.sums[name] / n if n else None) for name, n in self.counts.items()}

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)
