"""Everything around the training loop: builds the trainer's parts, starts them, serves the ops port.

`TrainerRuntime.start()` builds the score source (every rank) and, on rank
0, the rollout source and the prompt feeder; hands them to the `Trainer`;
resumes it when asked (the trainer restores the feeder's position and the
rollout ids its checkpoint used); then on rank 0 starts feeding prompts,
serves `/metrics`, `/healthz`, `/readyz` and `/status`, and runs the eval
rounds (`eval.EvalRounds`) after each step. It reads what the trainer
publishes (status, metrics, step) and never its internals. No training math.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from opd.loop_thread import LoopThread
from opd.ops_app import OpsServer, create_ops_app
from student_trainer.config import TrainerConfig
from student_trainer.data import PromptFeeder, RolloutSource
from student_trainer.eval import EvalRounds
from student_trainer.model import DistInfo
from student_trainer.score_source import ScoreSource, create_score_source
from student_trainer.trainer import Trainer

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def trainer_ops_app(status: Callable[[], dict], registry, ready: Callable[[], bool]):
    """The trainer's ops app: the shared routes plus `/status` (JSON) and the live page at `/`."""
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

    return create_ops_app("trainer", registry, ready=ready, routers=[router])


class TrainerRuntime:
    def __init__(self, config: TrainerConfig, info: DistInfo, io: LoopThread) -> None:
        self.config, self.info, self.io = config, info, io
        self.trainer: Trainer | None = None
        self.ops_port: int | None = None
        self._scores: ScoreSource | None = None
        self._source: RolloutSource | None = None
        self._feeder: PromptFeeder | None = None
        self._feed_task = None
        self._evals: EvalRounds | None = None
        self._ops: OpsServer | None = None
        self._ready = False

    def start(self) -> None:
        cfg = self.config
        self._scores = create_score_source(cfg, self.io)
        if self.info.is_main:
            self._source = RolloutSource(cfg)
            self._feeder = PromptFeeder(self._source, cfg) if cfg.data.prompts else None
        self.trainer = trainer = Trainer(
            cfg, self.info, self.io, scores=self._scores, source=self._source, feeder=self._feeder
        )
        trainer.resume()
        if not self.info.is_main:
            return
        self._ops = OpsServer(
            trainer_ops_app(trainer.status.snapshot, trainer.metrics.registry, lambda: self._ready),
            cfg.ops.host,
            cfg.ops.port,
        )
        self.ops_port = self.io.call(self._ops.start())
        if self._feeder is not None:
            self._feed_task = self.io.submit(self._feeder.feed_train(self._feeder.train_records()))
        if cfg.eval.every_steps:
            eval_feeder = PromptFeeder(self._source, cfg)
            self._evals = EvalRounds(
                self.io,
                eval_feeder,
                self._source,
                self._scores,
                eval_feeder.eval_records(),
                cfg.checkpoint.dir,
                mark_used=trainer.mark_used,
                report=trainer.record_eval,
            )
            self._evals.start(trainer.step_no)  # the baseline: the policy before this run's first step
        self._ready = True
        log.info(
            "trainer ready: step %d, %d rank(s), ops on port %d", trainer.step_no, self.info.world_size, self.ops_port
        )

    def after_step(self) -> None:
        """Rank 0: surface a failed prompt feeder; start and advance the eval rounds."""
        if not self.info.is_main:
            return
        if self._feed_task is not None and self._feed_task.done() and self._feed_task.exception():
            raise RuntimeError(f"prompt feeder failed: {self._feed_task.exception()}")
        if self._evals is not None:
            if self.trainer.step_no % self.config.eval.every_steps == 0:
                self._evals.start(self.trainer.step_no)
            self._evals.progress()

    def finish(self, timeout_s: float = 300.0) -> None:
        """After the last step: wait (up to `timeout_s`) for eval rounds still in flight, then report them."""
        if self._evals is not None:
            self._evals.finish(timeout_s)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        if self._feed_task is not None:
            self._feed_task.cancel()
        if self._scores is not None:
            self._scores.close()
        if self._ops is not None:
            self.io.call(self._ops.stop())
        if self._source is not None:
            self.io.call(self._source.close())
