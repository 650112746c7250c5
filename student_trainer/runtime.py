"""Everything around the training loop: builds the trainer's parts, starts them, serves the ops port.

`TrainerRuntime.start()` builds the score source (every rank) and, on rank
0, the rollout source and the prompt feeder; builds the `BatchProducer` and
the `Settlement` from them and hands those to the `Trainer`; resumes it when
asked (the trainer restores the feeder's position and ledger
and the samples its checkpoint used); then on rank 0 counts what a previous
run left in flight in Redis and starts feeding prompts, serves `/metrics`,
`/healthz`, `/readyz` and `/status`, and runs the eval rounds
(`groups.eval.EvalRounds`: once before the first step, then every
`eval.every_steps`, training paused meanwhile). It holds the run's
`StopSignal` (SIGTERM) and the `Waiter` every part waits through, and is the
one place the parts are wired together (the rollout source gets its prompt
feeder here); it reads what the trainer publishes (status, metrics, step) and
never its internals. No training math.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from opd.loop_thread import LoopThread
from opd.ops_app import OpsAuth, OpsServer, create_ops_app, ops_auth
from opd.prompts import load_prompts
from opd.retry_metrics import RetryStatsCollector
from protos.records import PromptRecord
from student_trainer.batches import BatchProducer
from student_trainer.config import TrainerConfig
from student_trainer.groups.eval import EvalRounds
from student_trainer.groups.feeder import PromptFeeder
from student_trainer.groups.source import RolloutSource
from student_trainer.metrics import TrainerMetrics
from student_trainer.model import DistInfo
from student_trainer.score_sources.base import ScoreSource
from student_trainer.score_sources.factory import create_score_source
from student_trainer.settlement import Settlement
from student_trainer.trainer import Trainer
from student_trainer.waits import StopRequested, StopSignal, Waiter

if TYPE_CHECKING:
    from student_trainer.score_sources.offline import OfflineRolloutFeeder

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def trainer_ops_app(status: Callable[[], dict], registry, ready: Callable[[], bool], auth: OpsAuth | None = None):
    """The trainer's ops app: the shared routes plus `/status` (JSON) and the live page at `/`; with `auth`,
    all but /healthz /readyz /metrics need a token (`ops.tokens_file`)."""
    router = APIRouter()

    @router.get("/status")
    def status_route() -> dict:
        return status()

    @router.get("/", response_class=HTMLResponse)
    def live_page() -> str:
        return (STATIC / "live.html").read_text()

    @router.get("/static/chart.js")
    def chart_script() -> Response:
        return Response((STATIC / "chart.js").read_text(), media_type="text/javascript")

    return create_ops_app("trainer", registry, ready=ready, routers=[router], auth=auth)


def trainer_metrics(scores: ScoreSource, source: RolloutSource | None, feeder) -> TrainerMetrics:
    """The run's metrics registry: the trainer's own, rank 0's transport and feeder counters, and the score
    source's (its client's retries; per-teacher counters of several teachers)."""
    metrics = TrainerMetrics(source.stats if source is not None else None, feeder.stats if feeder is not None else None)
    if (retry_stats := getattr(scores, "retry_stats", None)) is not None:
        doc = "teacher calls retried (server down, queue full), by target and status code"
        metrics.registry.register(RetryStatsCollector(retry_stats, "opd_trainer_teacher_retries", doc))
    for collector in getattr(scores, "collectors", ()):  # a score source's own metrics (e.g. per teacher)
        metrics.registry.register(collector)
    return metrics


def train_records(config: TrainerConfig) -> list[PromptRecord]:
    data = config.data
    return load_prompts(data.prompts, data.source) if data.prompts else []


def eval_records(config: TrainerConfig) -> list[PromptRecord]:
    """The eval prompts, each carrying the eval rounds' own sampling settings (`eval.temperature`, ...) and n."""
    data, ev = config.data, config.eval
    if not data.eval_prompts:
        return []
    update: dict = {"split": "eval", "epochs": 1, "shuffle": False}
    if ev.n is not None:
        update["n_samples"] = ev.n
    records = load_prompts(data.eval_prompts, data.source.model_copy(update=update))
    for record in records:
        record.sampling_temperature, record.sampling_top_p, record.sampling_top_k = ev.temperature, ev.top_p, ev.top_k
    return records


class TrainerRuntime:
    def __init__(self, config: TrainerConfig, info: DistInfo, io: LoopThread, stop: StopSignal | None = None) -> None:
        """`stop`: the run's stop request (the caller's SIGTERM handler sets it); a new one when not given."""
        self.config, self.info, self.io = config, info, io
        self.stop = stop or StopSignal()
        self.trainer: Trainer | None = None
        self.ops_port: int | None = None
        self.scores: ScoreSource | None = None
        self._source: RolloutSource | None = None
        self._feeder: PromptFeeder | OfflineRolloutFeeder | None = None
        self._feed_task = None
        self._evals: EvalRounds | None = None
        self._ops: OpsServer | None = None
        self._ready = False

    def start(self) -> None:
        cfg = self.config
        self.stop.attach_store()
        waiter = Waiter(self.stop, cfg.wait_log_s)
        self.scores = create_score_source(cfg, self.io)
        if self.info.is_main:
            self._source = RolloutSource(cfg)
            self._feeder = PromptFeeder(self._source, cfg, train_records(cfg)) if cfg.data.prompts else None
            if cfg.teacher.scores_file:  # offline scores: the file's sequences are the rollouts (no workers)
                from student_trainer.score_sources.offline import OfflineRolloutFeeder

                self._feeder = OfflineRolloutFeeder(self._source, cfg)
            if self._feeder is not None:
                self._source.admit_with(self._feeder)
        settlement = Settlement(self.io, waiter, cfg.checkpoint.dir, self._source, self._feeder)
        self.trainer = trainer = Trainer(
            cfg,
            self.info,
            scores=self.scores,
            batches=BatchProducer(cfg.batch, self.info, self.io, self.scores, waiter, self._source),
            settlement=settlement,
            waiter=waiter,
            metrics=trainer_metrics(self.scores, self._source, self._feeder),
        )
        trainer.resume()
        if not self.info.is_main:
            return
        self._ops = OpsServer.from_config(
            trainer_ops_app(
                trainer.status.snapshot, trainer.metrics.registry, lambda: self._ready, auth=ops_auth(cfg.ops)
            ),
            cfg.ops,
        )
        self.ops_port = self.io.call(self._ops.start())
        source = self._source
        assert source is not None, "rank 0 reads the rollout stream"
        if self._feeder is not None:
            self.io.call(self._feeder.start_up(source.is_used))  # what a previous run left in flight
            self._feed_task = self.io.submit(self._feeder.run())
        if cfg.eval.every_steps:
            self._evals = EvalRounds(
                self.io,
                source,
                self.scores,
                eval_records(cfg),
                cfg.checkpoint.dir,
                waiter,
                timeout_s=cfg.eval.round_timeout_s,
                mark_used=settlement.mark_used,
                report=trainer.record_eval,
                pass_threshold=cfg.loss.pass_threshold,
            )
        self._ready = True
        log.info(
            "trainer ready: step %d, %d rank(s), ops on port %d", trainer.step_no, self.info.world_size, self.ops_port
        )
        self._eval_round()  # the baseline: the policy before this run's first step

    def after_step(self) -> None:
        """Rank 0: surface a failed prompt feeder; run an eval round every `eval.every_steps`."""
        if not self.info.is_main:
            return
        if self._feed_task is not None and self._feed_task.done() and self._feed_task.exception():
            raise RuntimeError(f"prompt feeder failed: {self._feed_task.exception()}")
        assert self.trainer is not None, "after_step runs after start"
        if self.trainer.step_no % max(1, self.config.eval.every_steps) == 0:
            self._eval_round()

    def _eval_round(self) -> None:
        """An eval round of the last published version (training waits); a stop request ends it unreported."""
        if self._evals is None or self.trainer is None:
            return
        try:
            self._evals.run(self.trainer.step_no, self.trainer.version)
        except StopRequested:
            log.info("eval round of step %d abandoned: stop requested", self.trainer.step_no)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        if self._feed_task is not None:
            self._feed_task.cancel()
        if self.scores is not None:
            self.scores.close()
        if self._ops is not None:
            self.io.call(self._ops.stop())
        if self._source is not None:
            self.io.call(self._source.close())
