"""The training loop: rollouts from Redis, teacher scores prefetched, chunked loss, FSDP2 step.

One `Trainer` per rank (torchrun, or a single process). It is given its parts
(the `ScoreSource` on every rank; on rank 0 the `RolloutSource` and, when the
trainer feeds prompts, the `PromptFeeder`) and owns the model, the optimizer,
the step, its metrics and status, and the ledger of rollouts used since the
last committed checkpoint. Every rank fetches the teacher scores of its own
share of each batch. The step, as `step()` reads:

 1. pull `groups_per_step` whole groups (rank 0) and broadcast them;
 2. drop or down-weight groups sampled more than `max_staleness` versions ago;
 3. keep `prefetch_depth` batches ahead whose teacher scores are in flight;
 4. wait for this batch's scores (teacher wait);
 5. forward each micro-batch to final hidden states, chunked loss, backward;
 6. clip; skip the step when the gradient norm is not finite; AdamW step;
 7. publish weights every `publish.every_steps`, checkpoint every
    `checkpoint.every_steps`, and only then acknowledge the rollouts used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

from opd.loop_thread import LoopThread
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer import checkpoint as ckpt
from student_trainer.batching import Group, split_across_ranks
from student_trainer.config import TrainerConfig
from student_trainer.data import PromptFeeder, RolloutSource
from student_trainer.loggers import StepLogger
from student_trainer.metrics import StepTimes, TrainerMetrics, TrainerStatus
from student_trainer.model import DistInfo, StudentLoss, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.publish import publish_weights
from student_trainer.score_source import ScoreSource
from student_trainer.step import StepRunner
from student_trainer.teacher_prefetch import Batch, TeacherPrefetch

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        info: DistInfo,
        io: LoopThread,
        *,
        scores: ScoreSource,
        source: RolloutSource | None = None,
        feeder: PromptFeeder | None = None,
    ) -> None:
        """`source` (and `feeder`, if any) on rank 0 only; the caller starts the feeder and closes the parts."""
        from transformers import AutoTokenizer

        assert (source is not None) == info.is_main, "rank 0, and only rank 0, reads the rollout stream"
        self.config, self.info, self.io = config, info, io
        self.scores, self.source, self.feeder = scores, source, feeder
        self.metrics = TrainerMetrics(source.stats if source is not None else None)
        self.status = TrainerStatus(max_steps=config.max_steps)
        self.tokenizer_dir = config.tokenizer or config.model
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        lm = load_student(config.model, info.device)
        scores.check(tokenizer_fingerprint(tokenizer), int(lm.get_output_embeddings().weight.shape[0]), config.model)
        self.root = shard_student(StudentLoss(lm, config.loss), config.dist, info.device)
        self.optimizer, self.scheduler = build_optimizer(self.root, config.optim, config.max_steps)
        self.runner = StepRunner(
            self.root, self.optimizer, self.scheduler, config, info, scores.top_k, scores.temperature
        )
        self.prefetch = TeacherPrefetch(scores, config.batch.prefetch_depth)
        self.step_no, self.version = 0, 0
        self._used_since_commit: list[str] = []
        self._feeder_position = 0  # kept for the checkpoint when this run feeds no prompts
        self.step_logger = StepLogger(config.logging, config, info.is_main)

    # -- resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the latest checkpoint if `checkpoint.resume`: model, optimizer, step, the feeder's position,
        and the rollouts it used (skipped if they are delivered again)."""
        path = ckpt.latest_checkpoint(self.config.checkpoint.dir) if self.config.checkpoint.resume else None
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.root, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_no, self.version = state["step"], state["version"]
        self._feeder_position = state["feeder_position"]
        if self.feeder is not None:
            self.feeder.position = self._feeder_position
        if self.source is not None:
            self.source.skip_used(state["used_ids"])
        self._used_since_commit = []

    # -- rollouts used and committed -------------------------------------------------------------

    def mark_used(self, rollout_ids: Iterable[str]) -> None:
        """Rollouts consumed (trained on by a step, or scored by an eval round): acknowledged on Redis once the
        next checkpoint is committed, and listed in it so a resumed run skips them."""
        self._used_since_commit += list(rollout_ids)

    def checkpoint(self) -> None:
        """Collective: save and commit a checkpoint, then (rank 0) acknowledge every rollout used since the last."""
        state = {
            "step": self.step_no,
            "version": self.version,
            "scheduler": self.scheduler.state_dict(),
            "feeder_position": self.feeder.position if self.feeder else self._feeder_position,
            "used_ids": self._used_since_commit,
        }
        ckpt.save_checkpoint(
            self.config.checkpoint.dir, self.step_no, self.root, self.optimizer, state, self.config.checkpoint.keep_last
        )
        if self.source is not None:  # committed: now the rollouts it used may leave the stream
            acked = self.io.call(self.source.ack(self._used_since_commit))
            self.metrics.rollouts.labels("trained").inc(acked)
        self._used_since_commit = []

    # -- 1-3: data and teacher prefetch --------------------------------------------------------

    def _pull(self) -> Batch:
        groups: list[Group] | None = None
        if self.source is not None:
            groups = self.io.call(self.source.next_groups(self.config.batch.groups_per_step))
            if self.feeder is not None:
                self.io.loop.call_soon_threadsafe(self.feeder.consumed, len(groups))
        box = [groups]
        dist.broadcast_object_list(box, src=0)
        kept, weights = self._apply_staleness(box[0])
        mine = split_across_ranks(kept, self.info.world_size)[self.info.rank]
        dropped = sum(len(g) for g in box[0]) - sum(len(g) for g in kept)
        return Batch(box[0], mine, weights, dropped)

    def _apply_staleness(self, groups: list[Group]) -> tuple[list[Group], dict[str, float]]:
        cfg = self.config.batch
        kept, weights = [], {}
        for group in groups:
            lag = max(0, self.version - min(r.policy_version for r in group))
            for _ in group:
                self.metrics.staleness.observe(lag)
            if lag <= cfg.max_staleness:
                kept.append(group)
            elif cfg.stale_policy == "downweight":
                kept.append(group)
                weights.update({r.rollout_id: cfg.stale_weight ** (lag - cfg.max_staleness) for r in group})
            else:
                self.metrics.rollouts.labels("dropped_stale").inc(len(group))
        return kept, weights

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        times = StepTimes()
        t0 = time.perf_counter()
        batch = self.prefetch.next(self._pull)  # 1-3
        times.data_wait_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores = batch.scores.result() if batch.scores is not None else {}  # 4
        times.teacher_wait_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        stats = self.runner.forward_backward(batch.groups, batch.mine, batch.weights, scores, self.step_no)  # 5
        grad_norm = self.runner.optimizer_step()  # 6
        if not math.isfinite(grad_norm):
            self.metrics.skipped_steps.inc()
        times.compute_s = time.perf_counter() - t2
        self.step_no += 1
        self.mark_used(r.rollout_id for g in batch.groups for r in g)
        stats.update(grad_norm=grad_norm, **{k: v for k, v in vars(times).items()})
        self._publish_and_checkpoint()  # 7
        self._record(stats, times)
        self._audit(batch, stats)
        self.step_logger.log(self.step_no, {**stats, "tokens_per_s": self.status.tokens_per_s})
        if self.source is not None:  # rollouts held until the next commit must not be reclaimed meanwhile
            self.io.call(self.source.keepalive())
        return stats

    # -- 7: publish, checkpoint, ack --------------------------------------------------------------

    def _publish_and_checkpoint(self) -> None:
        cfg = self.config
        if self.step_no % cfg.publish.every_steps == 0 or self.step_no == cfg.max_steps:
            target = publish_weights(
                self.root, self.tokenizer_dir, cfg.publish.uri, self.step_no, cfg.publish.keep_last, self.info.is_main
            )
            self.version = self.step_no
            if self.source is not None:
                self.io.call(self.source.announce(self.version, str(target.resolve()), self.step_no, time.time()))
                self.metrics.policy_version.set(self.version)
        if self.step_no % cfg.checkpoint.every_steps == 0 or self.step_no == cfg.max_steps:
            self.checkpoint()

    def _audit(self, batch: Batch, stats: dict[str, float]) -> None:
        """Rank 0 appends the step's statistics and which rollouts (and policy versions) it used to steps.jsonl."""
        if not self.info.is_main:
            return
        path = Path(self.config.checkpoint.dir) / "steps.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {
            "step": self.step_no,
            "time": time.time(),
            "version": self.version,
            "stats": {k: (v if math.isfinite(v) else None) for k, v in stats.items()},
            "tokens_per_s": self.status.tokens_per_s,
            "rollouts": [r.rollout_id for g in batch.groups for r in g],
            "policy_versions": sorted({r.policy_version for g in batch.groups for r in g}),
            "dropped_stale": batch.dropped_stale,
        }
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _record(self, stats: dict[str, float], times: StepTimes) -> None:
        m = self.metrics
        m.step.set(self.step_no)
        m.loss.set(stats.get("loss", math.nan))
        m.divergence.set(stats.get("mean_divergence", math.nan))
        m.entropy.set(stats.get("student_entropy", math.nan))
        m.grad_norm.set(stats["grad_norm"])
        tok_s = stats.get("tokens", 0.0) / max(times.total_s, 1e-9)
        m.tokens_per_s.set(tok_s)
        m.trained_tokens.inc(stats.get("tokens", 0.0))
        m.observe_times(times)
        s = self.status
        s.step, s.policy_version, s.tokens_per_s = self.step_no, self.version, tok_s
        s.last_losses = {k: stats[k] for k in ("loss", "mean_divergence", "student_entropy") if k in stats}
        s.step_time = {
            "data_wait_s": times.data_wait_s,
            "teacher_wait_s": times.teacher_wait_s,
            "compute_s": times.compute_s,
        }
        s.history.append({"step": self.step_no, "tokens_per_s": tok_s, **s.last_losses, **s.step_time})
        del s.history[:-1000]

    # -- eval reports and shutdown ------------------------------------------------------------------

    def record_eval(self, step: int, report: dict[str, float]) -> None:
        """An eval round of the policy at `step` finished: into the status page, the metrics and the step log."""
        self.status.eval = report
        self.status.evals.append(report)
        self.metrics.eval_reward.set(report["mean_reward"])
        self.metrics.eval_pass_at_1.set(report["pass_at_1"])
        self.metrics.eval_divergence.set(report["divergence"])
        self.step_logger.log(step, report, prefix="eval")

    def close(self) -> None:
        """Flush the step loggers (the parts given to the constructor are the caller's to close)."""
        self.step_logger.close()
