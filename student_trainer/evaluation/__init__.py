"""The evaluation core: per-token metrics, their accumulator and the statistics of a report.

- `divergence`: the sampled reverse KL (one log-prob floor), top-k + tail forward KL, top-1 agreement and the
  teacher-token diagnostics, per token, in numpy, and `TokenSums`, their one accumulator (token-weighted means);
- `stats`: pass@k, Wilson and bootstrap intervals (scipy), distinct-n and diversity.

Used by the trainer's step diagnostics and eval rounds (`student_trainer.diagnostics`,
`student_trainer.groups.eval`), `opd eval` and the demo's report (`opd_apps`). Imports neither torch nor a model;
does not sample, score or write anything.
"""

from student_trainer.evaluation.divergence import (
    LOGPROB_FLOOR,
    METRICS,
    TEACHER_KEYS,
    TOPK_METRICS,
    StudentTokenStats,
    TokenSums,
    divergences,
    reply_diagnostics,
    sampled_reverse_kl,
    teacher_diagnostics,
    top1_agreement,
)
from student_trainer.evaluation.stats import (
    PassAtK,
    bootstrap_ratio_interval,
    default_ks,
    distinct_n,
    diversity,
    mean_pass_at_k,
    pass_at_k,
    wilson_interval,
)

__all__ = [
    "LOGPROB_FLOOR",
    "METRICS",
    "TEACHER_KEYS",
    "TOPK_METRICS",
    "PassAtK",
    "StudentTokenStats",
    "TokenSums",
    "bootstrap_ratio_interval",
    "default_ks",
    "distinct_n",
    "diversity",
    "divergences",
    "mean_pass_at_k",
    "pass_at_k",
    "reply_diagnostics",
    "sampled_reverse_kl",
    "teacher_diagnostics",
    "top1_agreement",
    "wilson_interval",
]
