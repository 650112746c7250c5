"""Everything around the training loop: rank 0's Redis side, prompt feeding, eval rounds and the ops port.

`TrainerRuntime.start()` builds the `Trainer`, resumes it when asked, and on
rank 0 connects the rollout source (seeded with the rollout ids the
checkpoint already used, so redelivered ones are skipped), starts feeding
prompts from the checkpoint's position, and serves `/metrics`, `/healthz`,
`/readyz` and `/status`. `after_step()` runs eval rounds and keeps held
rollouts from being reclaimed. No training math here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from opd.loop_thread import LoopThread
from opd.ops_app import OpsServer, create_ops_app
from student_trainer.config import TrainerConfig
from student_trainer.data import PromptFeeder, RolloutSource
from student_trainer.eval import EvalRound, eval_report
from student_trainer.model import DistInfo
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
        self._ops: OpsServer | None = None
        self._feed_task = None
        self._eval_records: list = []
        self._eval_feeder: PromptFeeder | None = None
        self._rounds: list[EvalRound] = []
        self._ready = False

    def start(self) -> None:
        self.trainer = Trainer(self.config, self.info, self.io)
        used = self.trainer.resume()
        if not self.info.is_main:
            return
        self.trainer.source = source = RolloutSource(self.config, used)
        self._ops = OpsServer(self._ops_app(), self.config.ops.host, self.config.ops.port)
        self.ops_port = self.io.call(self._ops.start())
        if self.config.data.prompts:
            feeder = self.trainer.feeder = PromptFeeder(source, self.config, self.trainer.feeder_position)
            self._feed_task = self.io.submit(feeder.feed_train(feeder.train_records()))
        if self.config.eval.every_steps:
            self._eval_feeder = PromptFeeder(source, self.config, 0)
            self._eval_records = self._eval_feeder.eval_records()
            self._start_eval_round()  # the baseline: the policy before this run's first step
        self._ready = True
        log.info("trainer ready: step %d, %d rank(s), ops on port %d", self.trainer.step_no,
                 self.info.world_size, self.ops_port)

    def _ops_app(self):
        return trainer_ops_app(self.trainer.status.snapshot, self.trainer.metrics.registry, lambda: self._ready)

    def after_step(self) -> None:
        if not self.info.is_main:
            return
        trainer = self.trainer
        if self._feed_task is not None and self._feed_task.done() and self._feed_task.exception():
            raise RuntimeError(f"prompt feeder failed: {self._feed_task.exception()}")
        every = self.config.eval.every_steps
        if every and trainer.step_no % every == 0:
            self._start_eval_round()
        self._progress_eval()
        self.io.call(trainer.source.keepalive())

    def _start_eval_round(self) -> None:
        round_id = self.trainer.step_no
        expected = self.io.call(self._eval_feeder.feed_eval(self._eval_records, round_id))
        self._rounds.append(EvalRound(round_id, self.trainer.step_no, expected))

    def _progress_eval(self) -> None:
        source, trainer = self.trainer.source, self.trainer
        for rnd in list(self._rounds):
            rnd.records += source.take_eval(rnd.suffix)
            if rnd.complete and rnd.scores is None:
                rnd.scores = trainer.teacher.submit(rnd.records)
                trainer.used_since_commit += [r.rollout_id for r in rnd.records]  # acked with the next checkpoint
            if rnd.scores is not None and rnd.scores.done():
                report = {"step": rnd.step, **eval_report(rnd.records, rnd.scores.result())}
                trainer.status.eval = report
                trainer.status.evals.append(report)
                self._write_eval(report, rnd.records)
                trainer.metrics.eval_reward.set(report["mean_reward"])
                trainer.metrics.eval_pass_at_1.set(report["pass_at_1"])
                trainer.metrics.eval_divergence.set(report["divergence"])
                trainer.step_logger.log(rnd.step, report, prefix="eval")
                log.info("eval @ step %d: %s", rnd.step, {k: round(v, 4) for k, v in report.items()})
                self._rounds.remove(rnd)

    def _write_eval(self, report: dict, records: list) -> None:
        """Append the round's report (and its samples' ids, rewards) to evals.jsonl beside the checkpoints."""
        path = Path(self.config.checkpoint.dir) / "evals.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if v == v else None) for k, v in report.items()}  # NaN -> null
        with path.open("a") as f:
            f.write(json.dumps({**finite, "time": time.time(), "policy_versions":
                                sorted({r.policy_version for r in records})}) + "\n")

    def finish(self, timeout_s: float = 300.0) -> None:
        """After the last step: wait (up to `timeout_s`) for eval rounds still in flight, then report them."""
        if not self.info.is_main:
            return
        deadline = time.monotonic() + timeout_s
        while self._rounds and time.monotonic() < deadline:
            self.io.call(self.trainer.source.poll())
            self._progress_eval()
        for rnd in self._rounds:
            log.warning("eval round of step %d incomplete: %d of %d rollouts arrived", rnd.step, len(rnd.records),
                        rnd.expected)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.step_logger.close()
        if self._feed_task is not None:
            self._feed_task.cancel()
        if self.trainer is not None:
            self.trainer.teacher.close()
        if self._ops is not None:
            self.io.call(self._ops.stop())
        if self.trainer is not None and self.trainer.source is not None:
            self.io.call(self.trainer.source.close())
