"""The sinks of the trainer's step and eval reports: Prometheus (`opd_trainer_*`), `/status`, TensorBoard and W&B.

`TrainerMetrics` (the registry exported on the ops port), `TrainerStatus` (the `/status` snapshot) and
`StepLogger` (TensorBoard / Weights & Biases) each read a step's `report.StepReport` and an eval round's report;
none computes a statistic. (`steps.jsonl` is the settlement's, the progress line `opd train`'s.)

Prometheus and `/status` are always on. TensorBoard and W&B are for people who follow runs there: each backend is
imported only when its option is set, a missing package is a clear error at start-up, not a crash mid-run; rank 0
logs, other ranks get a logger that does nothing; the run's config goes to W&B redacted (`opd.redaction`): no
token, no password.

Besides the training metrics, the registry exports rank 0's transport
counters (`opd_trainer_dead_lettered_records_total`, duplicates, retries,
reclaims: the rollout source's `StreamStats`) through the shared
`opd.stream_metrics.StreamStatsCollector`, as the rollout workers do, and the
prompt feeder's `FeedStats` (`opd_trainer_prompts_refed_total` and
`opd_trainer_prompts_lost_total`, by reason).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from opd.redaction import redacted_dump
from opd.stream_metrics import StreamStatsCollector
from opd.streams import StreamStats
from student_trainer.config import LoggingConfig, TrainerConfig
from student_trainer.groups.ledger import REASONS, FeedStats
from student_trainer.report import StepReport

_STEP_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOSSES = ("loss", "mean_divergence", "student_entropy")  # the status page's last losses


@dataclass
class TrainerStatus:
    step: int = 0
    max_steps: int = 0
    policy_version: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)
    step_time: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    eval: dict[str, float] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def snapshot(self) -> dict:
        return asdict(self)

    def observe(self, report: StepReport) -> None:
        self.step, self.policy_version, self.tokens_per_s = report.step, report.version, report.tokens_per_s
        measured = report.measured()
        self.last_losses = {k: measured[k] for k in _LOSSES if k in measured}
        self.step_time = asdict(report.times)
        self.history.append({"step": report.step, "tokens_per_s": report.tokens_per_s, **self.last_losses})
        self.history[-1].update(self.step_time)
        del self.history[:-1000]

    def observe_eval(self, report: dict[str, float]) -> None:
        self.eval = report
        self.evals.append(report)


class FeedStatsCollector(Collector):
    """The prompt feeder's refeeds and losses, by reason (every reason exported, zeros included)."""

    def __init__(self, stats: FeedStats) -> None:
        self.stats = stats

    def collect(self):
        refed = CounterMetricFamily(
            "opd_trainer_prompts_refed",
            "prompts fed again (same id) after yielding no group, by reason",
            labels=["reason"],
        )
        lost = CounterMetricFamily(
            "opd_trainer_prompts_lost", "prompts given up after data.max_refeeds refeeds, by reason", labels=["reason"]
        )
        for reason in REASONS:
            refed.add_metric([reason], self.stats.refed[reason])
            lost.add_metric([reason], self.stats.lost[reason])
        yield refed
        yield lost


class TrainerMetrics:
    def __init__(self, stream_stats: StreamStats | None = None, feed_stats: FeedStats | None = None) -> None:
        """`stream_stats`: the rollout source's counters (rank 0); `feed_stats`: the prompt feeder's (rank 0, when
        the trainer feeds prompts); zeros where the process has none."""
        self.registry = r = CollectorRegistry()
        r.register(StreamStatsCollector(stream_stats if stream_stats is not None else StreamStats(), "trainer"))
        r.register(FeedStatsCollector(feed_stats if feed_stats is not None else FeedStats()))
        self.loss = Gauge("opd_trainer_loss", "loss of the last step", registry=r)
        self.divergence = Gauge("opd_trainer_divergence", "mean per-token divergence of the last step", registry=r)
        self.entropy = Gauge("opd_trainer_student_entropy_nats", "mean student entropy of the last step", registry=r)
        self.grad_norm = Gauge("opd_trainer_grad_norm", "global gradient norm before clipping", registry=r)
        self.tokens_per_s = Gauge("opd_trainer_tokens_per_second", "trained tokens per second, last step", registry=r)
        self.step = Gauge("opd_trainer_step", "optimizer steps done", registry=r)
        self.policy_version = Gauge("opd_trainer_policy_version", "last published policy version", registry=r)
        self.step_time = Histogram(
            "opd_trainer_step_time_seconds", "step wall time by phase", ["phase"], buckets=_STEP_BUCKETS_S, registry=r
        )
        self.staleness = Histogram(
            "opd_trainer_staleness_versions",
            "policy versions between sampling and training",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.rollouts = Counter("opd_trainer_rollouts_total", "rollouts consumed, by outcome", ["outcome"], registry=r)
        self.trained_tokens = Counter("opd_trainer_trained_tokens_total", "tokens with a loss", registry=r)
        self.skipped_steps = Counter(
            "opd_trainer_skipped_steps_total", "steps skipped for a non-finite gradient", registry=r
        )
        self.empty_steps = Counter(
            "opd_trainer_empty_steps",
            "batches pulled that were all stale: nothing trained, no step counted, nothing published",
            registry=r,
        )
        self.eval_reward = Gauge("opd_trainer_eval_mean_reward", "mean reward on the eval prompts", registry=r)
        self.eval_pass_at_1 = Gauge("opd_trainer_eval_pass_at_1", "share of eval samples with reward > 0", registry=r)
        self.eval_divergence = Gauge(
            "opd_trainer_eval_divergence",
            "mean per-token sampled reverse KL to the teacher on eval samples",
            registry=r,
        )

        self.teacher = {  # per-step teacher-token diagnostics (student_trainer.diagnostics), by stats key
            "teacher_entropy_topk_tail": Gauge(
                "opd_trainer_teacher_entropy_topk_tail_nats",
                "mean teacher entropy over its top-k + tail bucket on the last step's tokens: a LOWER BOUND of "
                "the teacher's full entropy",
                registry=r,
            ),
            "teacher_p_sampled": Gauge(
                "opd_trainer_teacher_p_sampled", "mean teacher probability of the sampled token, last step", registry=r
            ),
            "sampled_in_teacher_topk": Gauge(
                "opd_trainer_sampled_in_teacher_topk_ratio",
                "share of the last step's sampled tokens inside the teacher's top-k",
                registry=r,
            ),
        }
        self.rewards_missing = Counter(
            "opd_trainer_rewards_missing_total",
            "trained rollouts without a reward (timed out, raised, no reference): distilled, left out of every "
            "reward-based term",
            registry=r,
        )

    def observe(self, report: StepReport) -> None:
        """A trained step: its gauges, counters and histograms (a statistic not measured: NaN gauge)."""
        for lag in report.staleness:
            self.staleness.observe(lag)
        if report.dropped_stale:
            self.rollouts.labels("dropped_stale").inc(report.dropped_stale)
        if not math.isfinite(report.grad_norm):
            self.skipped_steps.inc()
        self.step.set(report.step)
        self.loss.set(report.loss)
        self.divergence.set(report.get("mean_divergence"))
        self.entropy.set(report.get("student_entropy"))
        self.grad_norm.set(report.grad_norm)
        self.tokens_per_s.set(report.tokens_per_s)
        self.trained_tokens.inc(report.tokens)
        for key, gauge in self.teacher.items():
            gauge.set(report.get(key))
        self.rewards_missing.inc(report.rewards_missing or 0.0)
        self.step_time.labels("data").observe(report.times.data_wait_s)
        self.step_time.labels("teacher").observe(report.times.teacher_wait_s)
        self.step_time.labels("compute").observe(report.times.compute_s)

    def observe_eval(self, report: dict[str, float]) -> None:
        self.eval_reward.set(report["mean_reward"])
        self.eval_pass_at_1.set(report["pass_at_1"])
        self.eval_divergence.set(report["divergence"])


class StepLogger:
    """TensorBoard and W&B logging of the step and eval statistics (rank 0; see the module docstring)."""

    def __init__(self, config: LoggingConfig, run_config: TrainerConfig, is_main: bool) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        if not is_main:
            return
        if config.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError(
                    "logging.tensorboard_dir is set but the `tensorboard` package is missing: "
                    "pip install tensorboard (or unset --logging-tensorboard-dir)"
                ) from exc
            self._tb = SummaryWriter(log_dir=config.tensorboard_dir)
        if config.wandb_project:
            try:
                import wandb  # pyright: ignore[reportMissingImports]  # optional, not in opd's dependencies
            except ImportError as exc:
                raise ValueError(
                    "logging.wandb_project is set but the `wandb` package is missing: "
                    "pip install wandb (or unset --logging-wandb-project)"
                ) from exc
            self._wandb = wandb.init(
                project=config.wandb_project,
                name=config.wandb_run_name,
                mode=config.wandb_mode,
                config=redacted_dump(run_config),  # the run's config, without the teacher token or Redis password
            )

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        finite = {
            f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
