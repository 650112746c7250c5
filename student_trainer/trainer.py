"""The training loop: rollouts from Redis, teacher scores prefetched over gRPC, chunked loss, FSDP2 step.

One `Trainer` per rank (torchrun, or a single process). Rank 0 owns the Redis
side (`data.RolloutSource`, the prompt feeder, acks, policy announcements)
and the ops port; every rank fetches the teacher scores of its own share of
each batch. The step, as `step()` reads:

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

import collections
import json
import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from opd.loop_thread import LoopThread
from student_trainer import checkpoint as ckpt
from student_trainer.batching import Group, split_across_ranks
from student_trainer.config import TrainerConfig
from student_trainer.loggers import StepLogger
from student_trainer.metrics import StepTimes, TrainerMetrics, TrainerStatus
from student_trainer.model import DistInfo, StudentLoss, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.publish import publish_weights
from student_trainer.step import StepRunner
from student_trainer.teacher_prefetch import TeacherPrefetcher

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    groups: list[Group]  # the whole step (every rank's share)
    mine: list[Group]
    weights: dict[str, float]  # rollout id -> staleness weight
    scores: Future | None
    dropped_stale: int = 0  # rollouts of the step dropped for staleness (the same on every rank)


class Trainer:
    def __init__(self, config: TrainerConfig, info: DistInfo, io: LoopThread) -> None:
        from protos.tokenizer_fingerprint import tokenizer_fingerprint
        from transformers import AutoTokenizer

        self.config, self.info, self.io = config, info, io
        self.metrics, self.status = TrainerMetrics(), TrainerStatus(max_steps=config.max_steps)
        self.tokenizer_dir = config.tokenizer or config.model
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        lm = load_student(config.model, info.device)
        self.teacher = TeacherPrefetcher(config, io)
        self.teacher.check(tokenizer_fingerprint(tokenizer), int(lm.get_output_embeddings().weight.shape[0]),
                           config.model)
        self.root = shard_student(StudentLoss(lm, config.loss), config.dist, info.device)
        self.optimizer, self.scheduler = build_optimizer(self.root, config.optim, config.max_steps)
        self.runner = StepRunner(self.root, self.optimizer, self.scheduler, config, info,
                                 self.teacher.top_k, self.teacher.temperature)
        self.step_no, self.version = 0, 0
        self.used_since_commit: list[str] = []
        self.feeder_position = 0
        self._pending: collections.deque[_Batch] = collections.deque()
        self.step_logger = StepLogger(config.logging, config, info.is_main)
        self.source = None  # rank 0: data.RolloutSource, set by the runner
        self.feeder = None  # rank 0: data.PromptFeeder when the trainer feeds prompts

    # -- resume -------------------------------------------------------------------------------

    def resume(self) -> list[str]:
        """Load the latest checkpoint if asked; returns the rollout ids it had already used."""
        path = ckpt.latest_checkpoint(self.config.checkpoint.dir) if self.config.checkpoint.resume else None
        if path is None:
            return []
        state = ckpt.load_checkpoint(path, self.root, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_no, self.version = state["step"], state["version"]
        self.feeder_position = state["feeder_position"]
        self.used_since_commit = []
        return list(state["used_ids"])

    # -- 1-3: data and teacher prefetch --------------------------------------------------------

    def _pull(self) -> _Batch:
        groups: list[Group] | None = None
        if self.info.is_main:
            groups = self.io.call(self.source.next_groups(self.config.batch.groups_per_step))
            if self.feeder is not None:
                self.io.loop.call_soon_threadsafe(self.feeder.consumed, len(groups))
        box = [groups]
        dist.broadcast_object_list(box, src=0)
        kept, weights = self._apply_staleness(box[0])
        mine = split_across_ranks(kept, self.info.world_size)[self.info.rank]
        records = [r for g in mine for r in g]
        dropped = sum(len(g) for g in box[0]) - sum(len(g) for g in kept)
        return _Batch(box[0], mine, weights, self.teacher.submit(records) if records else None, dropped)

    def _apply_staleness(self, groups: list[Group]) -> tuple[list[Group], dict[str, float]]:
        cfg = self.config.batch
        kept, weights = [], {}
        for group in groups:
            lag = max(0, self.version - min(r.policy_version for r in group))
            for r in group:
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
        while len(self._pending) < self.config.batch.prefetch_depth + 1:  # 1-3
            self._pending.append(self._pull())
        batch = self._pending.popleft()
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
        self.used_since_commit += [r.rollout_id for g in batch.groups for r in g]
        stats.update(grad_norm=grad_norm, **{k: v for k, v in vars(times).items()})
        self._publish_and_checkpoint()  # 7
        self._record(stats, times)
        self._audit(batch, stats)
        self.step_logger.log(self.step_no, {**stats, "tokens_per_s": self.status.tokens_per_s})
        return stats

    # -- 7: publish, checkpoint, ack --------------------------------------------------------------

    def _publish_and_checkpoint(self) -> None:
        cfg = self.config
        if self.step_no % cfg.publish.every_steps == 0 or self.step_no == cfg.max_steps:
            target = publish_weights(self.root, self.tokenizer_dir, cfg.publish.uri, self.step_no,
                                     cfg.publish.keep_last, self.info.is_main)
            self.version = self.step_no
            if self.info.is_main:
                self.io.call(self.source.announce(self.version, str(target.resolve()), self.step_no, time.time()))
                self.metrics.policy_version.set(self.version)
        if self.step_no % cfg.checkpoint.every_steps == 0 or self.step_no == cfg.max_steps:
            self.checkpoint()

    def checkpoint(self) -> None:
        state = {"step": self.step_no, "version": self.version, "scheduler": self.scheduler.state_dict(),
                 "feeder_position": self.feeder.position if self.feeder else self.feeder_position,
                 "used_ids": self.used_since_commit}
        ckpt.save_checkpoint(self.config.checkpoint.dir, self.step_no, self.root, self.optimizer, state,
                             self.config.checkpoint.keep_last)
        if self.info.is_main:  # committed: now the rollouts it used may leave the stream
            acked = self.io.call(self.source.ack(self.used_since_commit))
            self.metrics.rollouts.labels("trained").inc(acked)
        self.used_since_commit = []

    def _audit(self, batch: _Batch, stats: dict[str, float]) -> None:
        """Rank 0 appends the step's statistics and which rollouts (and policy versions) it used to steps.jsonl."""
        if not self.info.is_main:
            return
        path = Path(self.config.checkpoint.dir) / "steps.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {"step": self.step_no, "time": time.time(), "version": self.version,
                "stats": {k: (v if math.isfinite(v) else None) for k, v in stats.items()},
                "tokens_per_s": self.status.tokens_per_s,
                "rollouts": [r.rollout_id for g in batch.groups for r in g],
                "policy_versions": sorted({r.policy_version for g in batch.groups for r in g}),
                "dropped_stale": batch.dropped_stale}
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
        s.step_time = {"data_wait_s": times.data_wait_s, "teacher_wait_s": times.teacher_wait_s,
                       "compute_s": times.compute_s}
        s.history.append({"step": self.step_no, "tokens_per_s": tok_s, **s.last_losses, **s.step_time})
        del s.history[:-1000]
