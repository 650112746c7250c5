"""The consumer half of the training loop: the student model, its step, publishing and checkpoints.

One `Trainer` per rank (torchrun, or a single process). It is given its parts: the `BatchProducer` (ready batches:
rollouts pulled, split across ranks, teacher scores prefetched, staleness judged), the `Settlement` (every side
effect of a step outside the model: used samples, acks, the prompt feeder, steps.jsonl), the score source (checked
against the student once, at start-up) and the run's `Waiter`. It owns the model, the optimizer, the step, the
published version and the checkpoints, and reports each step once (`report.StepReport`) to every sink. The step,
as `step()` reads (the README's numbered list):

 1-3. the next ready batch (`BatchProducer.next`): `groups_per_step` whole groups pulled (rank 0) and shared out
      across the ranks; `prefetch_depth` batches ahead with their teacher scores in flight (this batch's awaited;
      then the ranks agree at the step boundary that none is stopping, else `step()` returns None and nothing is
      trained); groups sampled more than `max_staleness` versions before this step dropped or down-weighted; a
      batch left with no group is not a step (`_skip_empty`: nothing published, no LR step, no step counted; the
      next one is pulled and the step's report counts it in `empty_steps`);
 4-5. pack this rank's share into micro-batches, forward each to final hidden states, chunked loss, backward;
      clip, skip the update when the gradient norm is not finite, AdamW (`step.StepRunner.update`); with
      `batch.mini_batches` k > 1, k such updates on k parts of the share (verl's PPO mini-batches), while the
      step count, the LR schedule, the published version, acks and every cadence below advance once per batch;
 6. publish weights every `publish.every_steps`, checkpoint every `checkpoint.every_steps`, and only then
    acknowledge the rollouts used (`_finish`, with every other effect of the step, in the order that needs).

Every wait (rollouts, teacher scores, other ranks, checkpoint barriers) goes through `waits.Waiter`: it logs what
it waits for every `wait_log_s`, and a stop request (SIGTERM on any rank) ends the waits for rollouts and scores.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer import checkpoint as ckpt
from student_trainer import lora
from student_trainer.batches import BatchProducer, ReadyBatch
from student_trainer.config import TrainerConfig
from student_trainer.metrics import StepLogger, TrainerMetrics, TrainerStatus
from student_trainer.model import DistInfo, StudentLoss, causal_lm, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.publish import publish_weights
from student_trainer.report import StepReport, StepTimes
from student_trainer.score_sources.base import ScoreSource
from student_trainer.settlement import Settlement
from student_trainer.step import StepRunner
from student_trainer.waits import Waiter, barrier

log = logging.getLogger(__name__)


@dataclass
class EmptyPulls:
    """The batches pulled for one step that were left with no group (all stale): what the step's report adds."""

    count: int = 0
    dropped_stale: int = 0
    lags: list[int] = field(default_factory=list)
    data_wait_s: float = 0.0
    teacher_wait_s: float = 0.0

    def add(self, batch: ReadyBatch) -> None:
        self.count += 1
        self.dropped_stale += batch.dropped_stale
        self.lags += batch.lags
        self.data_wait_s += batch.data_wait_s
        self.teacher_wait_s += batch.teacher_wait_s


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        info: DistInfo,
        *,
        scores: ScoreSource,
        batches: BatchProducer,
        settlement: Settlement,
        waiter: Waiter,
        metrics: TrainerMetrics,
    ) -> None:
        """`scores`: this rank's `ScoreSource` (checked against the student here); `metrics`: the run's registry
        (the runtime registers the transport's and the feeder's counters in it)."""
        from transformers import AutoTokenizer

        self.config, self.info, self.waiter = config, info, waiter
        self.batches, self.settlement = batches, settlement
        self.metrics, self.status = metrics, TrainerStatus(max_steps=config.max_steps)
        self.step_logger = StepLogger(config.logging, config, info.is_main)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        lm = load_student(config.model, info.device)
        vocab_size = int(causal_lm(lm).get_output_embeddings().weight.shape[0])
        scores.check(tokenizer_fingerprint(tokenizer), vocab_size, config.model)
        self.base_id = lora.base_identity(config.model) if config.lora.enabled else ""  # what adapters apply to
        lm = lora.apply_lora(lm, config.lora) if config.lora.enabled else lm
        root = shard_student(StudentLoss(lm, config.loss, config.batch.attention), config.dist, info.device)
        optimizer, scheduler = build_optimizer(root, config.optim, config.max_steps)
        reference = None
        if config.loss.kl.coef > 0:  # GRPO's KL penalty: the frozen initial student (LoRA: adapter disabled)
            from student_trainer.reference import build_reference

            reference = lora.AdapterDisabledReference(root) if config.lora.enabled else build_reference(config, info)
        self.runner = StepRunner(root, optimizer, scheduler, config, info, scores.top_k, scores.temperature, reference)
        self.step_no, self.version, self.last_checkpoint_step = 0, 0, 0
        self.stopped = False  # the ranks agreed to stop: nothing more is trained

    # -- resume and checkpoint ------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the latest checkpoint if `checkpoint.resume`: model, optimizer, step, the prompt feeder's position
        and ledger, and the samples it used (skipped if they are delivered again)."""
        path = ckpt.latest_checkpoint(self.config.checkpoint.dir) if self.config.checkpoint.resume else None
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.runner.root, self.runner.optimizer, self.base_id)
        self.runner.scheduler.load_state_dict(state["scheduler"])
        self.step_no, self.version = state["step"], state["version"]
        self.last_checkpoint_step = self.step_no
        self.settlement.resume(state)

    def checkpoint(self) -> None:
        """Collective: save and commit a checkpoint, then (rank 0) acknowledge every rollout used since the last."""
        state = {
            "step": self.step_no,
            "version": self.version,
            "scheduler": self.runner.scheduler.state_dict(),
            "base_id": self.base_id,  # "" for a full-weight student (resume checks the kind matches)
            "lora": self.config.lora.model_dump(),  # `opd export` rebuilds the adapters from it
            **self.settlement.checkpoint_state(),
        }
        ckpt.save_checkpoint(
            self.config.checkpoint.dir,
            self.step_no,
            self.runner.root,
            self.runner.optimizer,
            state,
            self.config.checkpoint.keep_last,
            barrier=functools.partial(barrier, self.waiter),
        )
        self.last_checkpoint_step = self.step_no
        self.metrics.rollouts.labels("trained").inc(self.settlement.committed())

    # -- the step -------------------------------------------------------------------------------------------------

    def step(self) -> StepReport | None:
        """One optimizer step; None, with nothing trained, when the ranks agreed to stop."""
        empty = EmptyPulls()
        while True:  # 1-3: pull, prefetch, stale; a batch left with no group is not a step
            batch = self.batches.next(self.version, self.config.max_steps - self.step_no)
            if batch is None:
                return self._stopping()
            if batch.groups:  # the same on every rank (broadcast): every rank trains, or none
                break
            self._skip_empty(batch, empty)
        t0 = time.perf_counter()
        # 4-5: forward, backward, clip, AdamW (skipped when the norm is not finite), once per mini-batch
        stats, grad_norm = self.runner.update(batch.groups, batch.mine, batch.weights, batch.scores, self.step_no)
        times = StepTimes(
            batch.data_wait_s + empty.data_wait_s, batch.teacher_wait_s + empty.teacher_wait_s, time.perf_counter() - t0
        )
        self.step_no += 1
        return self._finish(batch, stats, grad_norm, times, empty)  # 6: publish, checkpoint, then ack; report

    def _skip_empty(self, batch: ReadyBatch, empty: EmptyPulls) -> None:
        """Every group of the batch went stale: settle them (acknowledged, their prompts fed again) and train
        nothing. No publish (no new version: nothing changed), no LR step, no step counted for `max_steps`, the
        checkpoint or the eval cadence; counted in `empty_steps` and folded into the next step's report."""
        self.settlement.settle(batch, self.step_no)
        self.settlement.keepalive()
        empty.add(batch)
        self.metrics.empty_steps.inc()
        log.warning(
            "step %d: all %d rollouts pulled were stale (sampled more than batch.max_staleness versions before "
            "v%d): nothing trained, the step is not counted",
            self.step_no + 1,
            batch.dropped_stale,
            self.version,
        )

    def _finish(
        self, batch: ReadyBatch, stats: dict[str, float], grad_norm: float, times: StepTimes, empty: EmptyPulls
    ) -> StepReport:
        """Every effect of a trained step, in the order exactly-once needs: samples used and prompts settled,
        weights published, checkpoint committed (then acks), the report to every sink, steps.jsonl."""
        cfg = self.config
        self.settlement.settle(batch, self.step_no)
        if self.step_no % cfg.publish.every_steps == 0 or self.step_no == cfg.max_steps:
            self._publish()
        if self.step_no % cfg.checkpoint.every_steps == 0 or self.step_no == cfg.max_steps:
            self.checkpoint()
        report = StepReport.build(
            self.step_no,
            self.version,
            stats,
            grad_norm,
            times,
            dropped_stale=batch.dropped_stale + empty.dropped_stale,
            staleness=tuple(empty.lags + batch.lags),
            empty_steps=empty.count,
        )
        self.metrics.observe(report)
        self.status.observe(report)
        self.settlement.audit(batch, report)
        self.step_logger.log(self.step_no, {**report.stats(), "tokens_per_s": report.tokens_per_s})
        self.settlement.keepalive()
        return report

    def _stopping(self) -> None:
        self.stopped = True
        log.info("stopping at step %d (a stop was requested)", self.step_no)
        return None

    def _publish(self) -> None:
        cfg = self.config
        target = publish_weights(
            self.runner.root,
            cfg.tokenizer or cfg.model,
            cfg.publish.uri,
            self.step_no,
            cfg.publish.keep_last,
            self.info.is_main,
            cfg.publish.prune_grace_s,
            self.base_id,
        )
        self.version = self.step_no
        kind = "lora" if self.base_id else "full"
        self.settlement.announce(self.version, str(target.resolve()), self.step_no, kind, self.base_id)
        if self.info.is_main:
            self.metrics.policy_version.set(self.version)

    # -- eval reports and shutdown ----------------------------------------------------------------------------------

    def record_eval(self, step: int, report: dict[str, float]) -> None:
        """An eval round (of the policy version it names, at `step`) finished: into the status page, the metrics
        and the step log."""
        self.status.observe_eval(report)
        self.metrics.observe_eval(report)
        self.step_logger.log(step, report, prefix="eval")

    def close(self) -> None:
        """Flush the step loggers (the parts given to the constructor are the caller's to close)."""
        self.step_logger.close()
