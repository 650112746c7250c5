"""One step's report: a typed record of what a step did, the one thing every sink of step statistics reads.

`StepReport` is built once per trained step (`StepReport.build`, from the step runner's statistics, the gradient
norm, the `StepTimes` and the staleness the batch producer saw) and read by each sink: Prometheus and `/status`
(`metrics.TrainerMetrics.observe`, `metrics.TrainerStatus.observe`), TensorBoard/W&B (`metrics.StepLogger`),
`steps.jsonl` (`stats()`, the same keys the file has always had) and the progress line of `opd train`. A field is
None when the step did not measure it (no teacher, no reward, no tool episode), and a sink leaves it out, as it
left out the missing keys of the statistics dict before. Builds no statistics itself and writes nowhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Where one step's wall time went (seconds)."""

    data_wait_s: float = 0.0
    teacher_wait_s: float = 0.0
    compute_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.data_wait_s + self.teacher_wait_s + self.compute_s


# The step runner's statistics (`step.StepRunner.forward_backward`), in its order; None where a step has none.
_MEASURED = (
    "mean_divergence",
    "student_entropy",
    "top1_agreement",
    "fraction_kept",
    "reference_kl",
    "teacher_entropy_topk_tail",
    "teacher_p_sampled",
    "sampled_in_teacher_topk",
    "rewards_scored",
    "rewards_missing",
    "pass_rate",
    "tool_episodes",
    "tool_tokens",
    "tool_turns_mean",
)


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step did, as every sink reports it (`steps.jsonl`'s `stats` is `stats()`)."""

    step: int  # steps done, this one included
    version: int  # the policy version after this step (published or not)
    loss: float  # the step loss L, over all ranks
    tokens: float  # trained tokens, all ranks
    dropped_too_long: float  # rollouts longer than the student's context, left out
    grad_norm: float  # before clipping; not finite: the update was skipped
    times: StepTimes
    dropped_stale: int = 0  # rollouts of the step dropped for staleness
    staleness: tuple[int, ...] = ()  # versions between sampling and training, one per rollout pulled
    empty_steps: int = 0  # batches pulled before this step that were all stale: nothing trained, no step counted
    mean_divergence: float | None = None
    student_entropy: float | None = None
    top1_agreement: float | None = None
    fraction_kept: float | None = None
    reference_kl: float | None = None
    teacher_entropy_topk_tail: float | None = None
    teacher_p_sampled: float | None = None
    sampled_in_teacher_topk: float | None = None
    rewards_scored: float | None = None
    rewards_missing: float | None = None
    pass_rate: float | None = None
    tool_episodes: float | None = None
    tool_tokens: float | None = None
    tool_turns_mean: float | None = None
    trained: tuple[str, ...] = field(default=(), repr=False)  # rollout ids trained (steps.jsonl)

    @classmethod
    def build(
        cls, step: int, version: int, stats: dict[str, float], grad_norm: float, times: StepTimes, **batch
    ) -> StepReport:
        """From the step runner's statistics (every key must be a field: a new statistic is added here first);
        `batch`: `dropped_stale`, `staleness`, `empty_steps`, `trained`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(stats) - known
        if unknown:
            raise ValueError(f"step statistics {sorted(unknown)} have no StepReport field: add them to report.py")
        return cls(step=step, version=version, grad_norm=grad_norm, times=times, **stats, **batch)

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens per second of the step's wall time."""
        return self.tokens / max(self.times.total_s, 1e-9)

    def measured(self) -> dict[str, float]:
        """The statistics this step measured (None fields left out), in the step runner's order."""
        values = {"loss": self.loss, "tokens": self.tokens, "dropped_too_long": self.dropped_too_long}
        values.update({k: v for k in _MEASURED if (v := getattr(self, k)) is not None})
        return values

    def stats(self) -> dict[str, float]:
        """What `steps.jsonl` and the experiment loggers get: the measured statistics, the gradient norm and the
        step's times."""
        return {**self.measured(), "grad_norm": self.grad_norm, **dataclasses.asdict(self.times)}

    def get(self, name: str) -> float:
        """A statistic by name, NaN when not measured (for the sinks that show a fixed set)."""
        value = getattr(self, name, None)
        return math.nan if value is None else float(value)
