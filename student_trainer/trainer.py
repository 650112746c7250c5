"""The training loop: rollouts from Redis, teacher scores prefetched, chunked loss, FSDP2 step.

One `Trainer` per rank (torchrun, or a single process). It is given its parts
(the `ScoreSource` on every rank; on rank 0 the `RolloutSource` and, when the
trainer feeds prompts, the `PromptFeeder`) and owns the model, the optimizer,
the step, its metrics and status, and the ledger of samples used since the
last committed checkpoint. Every rank fetches the teacher scores of its own
share of each batch. The step, as `step()` reads:

 1. pull `groups_per_step` whole groups (rank 0) and broadcast them;
 2. keep `prefetch_depth` batches ahead whose teacher scores are in flight;
 3. wait for this batch's scores (teacher wait);
 4. step boundary: the ranks agree whether any of them is stopping (then
    nothing more is trained; `step()` returns None);
 5. drop or down-weight groups sampled more than `max_staleness` versions
    before now, the version this step trains (not the one it was pulled at);
 6. forward each micro-batch to final hidden states, chunked loss, backward;
 7. clip; skip the step when the gradient norm is not finite; AdamW step;
 8. publish weights every `publish.every_steps`, checkpoint every
    `checkpoint.every_steps`, and only then acknowledge the rollouts used.

Every wait (rollouts, teacher scores, other ranks, checkpoint barriers) goes
through `waits.Waiter`: it logs what it waits for every `wait_log_s`, and a
stop request (SIGTERM on any rank) ends the waits for rollouts and scores.
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
from opd.retry_metrics import RetryStatsCollector
from opd.stream_consumer import sample_key
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer import checkpoint as ckpt
from student_trainer.batching import Group, split_across_ranks
from student_trainer.config import TrainerConfig
from student_trainer.data import RolloutSource
from student_trainer.feeder import PromptFeeder
from student_trainer.loggers import StepLogger
from student_trainer.metrics import StepTimes, TrainerMetrics, TrainerStatus
from student_trainer.model import DistInfo, StudentLoss, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.publish import publish_weights
from student_trainer.score_source import ScoreSource
from student_trainer.step import StepRunner
from student_trainer.teacher_prefetch import Batch, TeacherPrefetch
from student_trainer.waits import StopRequested, StopSignal, Waiter, agree_stop, barrier, broadcast_flag

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
        stop: StopSignal | None = None,
    ) -> None:
        """`source` (and `feeder`, if any) on rank 0 only; the caller starts the feeder and closes the parts.
        `stop`: the run's stop request (SIGTERM), which ends the waits."""
        from transformers import AutoTokenizer

        assert (source is not None) == info.is_main, "rank 0, and only rank 0, reads the rollout stream"
        self.config, self.info, self.io = config, info, io
        self.scores, self.source, self.feeder = scores, source, feeder
        self.stop = stop or StopSignal()
        self.waiter = Waiter(self.stop, config.wait_log_s)
        self.stopped = False  # the ranks agreed to stop: nothing more is trained
        self.metrics = TrainerMetrics(
            source.stats if source is not None else None, feeder.stats if feeder is not None else None
        )
        if (retry_stats := getattr(scores, "retry_stats", None)) is not None:
            doc = "teacher calls retried (server down, queue full), by target and status code"
            self.metrics.registry.register(RetryStatsCollector(retry_stats, "opd_trainer_teacher_retries", doc))
        for collector in getattr(scores, "collectors", ()):  # a score source's own metrics (e.g. per teacher)
            self.metrics.registry.register(collector)
        self.status = TrainerStatus(max_steps=config.max_steps)
        self.tokenizer_dir = config.tokenizer or config.model
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        lm = load_student(config.model, info.device)
        scores.check(tokenizer_fingerprint(tokenizer), int(lm.get_output_embeddings().weight.shape[0]), config.model)
        self.root = shard_student(StudentLoss(lm, config.loss, config.batch.attention), config.dist, info.device)
        self.optimizer, self.scheduler = build_optimizer(self.root, config.optim, config.max_steps)
        reference = None
        if config.loss.kl.coef > 0:  # GRPO's KL penalty: the frozen initial student, sharded like the student
            from student_trainer.reference import build_reference

            reference = build_reference(config, info)
        self.runner = StepRunner(
            self.root, self.optimizer, self.scheduler, config, info, scores.top_k, scores.temperature, reference
        )
        self.prefetch = TeacherPrefetch(
            scores, config.batch.prefetch_depth, max_bytes=int(config.batch.prefetch_max_mib * 2**20)
        )
        self.step_no, self.version, self.last_checkpoint_step = 0, 0, 0
        self._used_since_commit: list[str] = []  # sample keys (prompt id / sample index)
        self._feeder_state: dict = {"position": 0}  # kept for the checkpoint when this run feeds no prompts
        self.step_logger = StepLogger(config.logging, config, info.is_main)

    # -- resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the latest checkpoint if `checkpoint.resume`: model, optimizer, step, the prompt feeder's position
        and ledger, and the samples it used (skipped if they are delivered again)."""
        path = ckpt.latest_checkpoint(self.config.checkpoint.dir) if self.config.checkpoint.resume else None
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.root, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_no, self.version = state["step"], state["version"]
        self.last_checkpoint_step = self.step_no
        self._feeder_state = state.get("feeder") or {"position": state["feeder_position"]}
        if self.feeder is not None:
            self.feeder.restore(self._feeder_state)
        if self.source is not None:
            used = state.get("used_keys")
            self.source.skip_used(used if used is not None else map(_key_of_rollout_id, state["used_ids"]))
        self._used_since_commit = []

    # -- samples used and committed -------------------------------------------------------------

    def mark_used(self, keys: Iterable[str]) -> None:
        """Samples (`opd.stream_consumer.sample_key`) consumed, trained on by a step or scored by an eval round:
        acknowledged on Redis once the next checkpoint is committed, and listed in it so a resumed run skips
        them."""
        self._used_since_commit += list(keys)

    def checkpoint(self) -> None:
        """Collective: save and commit a checkpoint, then (rank 0) acknowledge every rollout used since the last."""
        feeder = self.io.call(self.feeder.snapshot()) if self.feeder is not None else self._feeder_state
        state = {
            "step": self.step_no,
            "version": self.version,
            "scheduler": self.scheduler.state_dict(),
            "feeder": feeder,
            "feeder_position": feeder["position"],
            "used_keys": self._used_since_commit,
        }
        ckpt.save_checkpoint(
            self.config.checkpoint.dir,
            self.step_no,
            self.root,
            self.optimizer,
            state,
            self.config.checkpoint.keep_last,
            barrier=lambda what: barrier(self.waiter, what),
        )
        self.last_checkpoint_step = self.step_no
        if self.source is not None:  # committed: now the rollouts it used may leave the stream
            acked = self.waiter.result(
                self.io.submit(self.source.ack(self._used_since_commit)),
                f"Redis to acknowledge {len(self._used_since_commit)} rollouts",
                interruptible=False,
            )
            self.metrics.rollouts.labels("trained").inc(acked)
        self._used_since_commit = []

    # -- 1-2: data and teacher prefetch --------------------------------------------------------

    def _pull(self) -> Batch:
        """Rank 0 waits for the groups (a stop request ends the wait), then every rank learns whether there are
        any (StopRequested on every rank if not) and gets them."""
        groups: list[Group] | None = None
        n = self.config.batch.groups_per_step
        if self.source is not None:
            try:
                groups = self.waiter.result(self.io.submit(self.source.next_groups(n)), self._rollout_wait)
            except StopRequested:
                groups = None
        if not broadcast_flag(groups is not None, self.waiter, "rank 0 (rollouts, or an eval round)", self.info.device):
            raise StopRequested("stop requested while rank 0 waited for rollouts")
        box = [groups]
        dist.broadcast_object_list(box, src=0)
        if self.feeder is not None:
            self.io.call(self.feeder.on_taken(g[0].prompt_id for g in box[0]))
        return Batch(box[0], split_across_ranks(box[0], self.info.world_size)[self.info.rank], weights={})

    def _rollout_wait(self) -> str:
        text = self.source.waiting_for(self.config.batch.groups_per_step)
        return f"{text}; {self.feeder.describe()}" if self.feeder is not None else text

    def _teacher_scores(self, batch: Batch) -> tuple[dict, bool]:
        """This rank's scores, and whether a stop request ended the wait for them."""
        if batch.scores is None:
            return {}, False
        records = sum(len(g) for g in batch.mine)
        try:
            return self.waiter.result(batch.scores, f"teacher scores of {records} rollouts"), False
        except StopRequested:
            return {}, True

    # -- 5: staleness, judged when the batch is trained ------------------------------------------

    def _apply_staleness(self, batch: Batch) -> tuple[list[Group], list[Group], list[Group]]:
        """(groups trained, this rank's share of them, groups dropped as stale); fills the batch's weights."""
        cfg = self.config.batch
        stale: list[Group] = []
        for group in batch.groups:
            lag = max(0, self.version - min(r.policy_version for r in group))
            for _ in group:
                self.metrics.staleness.observe(lag)
            if lag <= cfg.max_staleness:
                continue
            if cfg.stale_policy == "downweight":
                batch.weights.update({r.rollout_id: cfg.stale_weight ** (lag - cfg.max_staleness) for r in group})
            else:
                stale.append(group)
                self.metrics.rollouts.labels("dropped_stale").inc(len(group))
        dropped = {g[0].group_id for g in stale}  # by group id: this rank's share may hold parts of a split group
        batch.dropped_stale = sum(len(g) for g in stale)
        trained = [g for g in batch.groups if g[0].group_id not in dropped]
        return trained, [g for g in batch.mine if g[0].group_id not in dropped], stale

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> dict[str, float] | None:
        """One optimizer step; None, with nothing trained, when the ranks agreed to stop."""
        times = StepTimes()
        t0 = time.perf_counter()
        try:
            batch = self.prefetch.next(self._pull, self.config.max_steps - self.step_no)  # 1-2
        except StopRequested:
            return self._stopping()
        times.data_wait_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores, interrupted = self._teacher_scores(batch)  # 3
        times.teacher_wait_s = time.perf_counter() - t1
        if agree_stop(interrupted or self.stop.is_set(), self.waiter, self.info.device):  # 4
            return self._stopping()
        trained, mine, stale = self._apply_staleness(batch)  # 5
        t2 = time.perf_counter()
        stats = self.runner.forward_backward(trained, mine, batch.weights, scores, self.step_no)  # 6
        grad_norm = self.runner.optimizer_step()  # 7
        if not math.isfinite(grad_norm):
            self.metrics.skipped_steps.inc()
        times.compute_s = time.perf_counter() - t2
        self.step_no += 1
        self.mark_used(sample_key(r) for g in trained for r in g)
        self._settle(trained, stale)
        stats.update(grad_norm=grad_norm, **{k: v for k, v in vars(times).items()})
        self._publish_and_checkpoint()  # 8
        self._record(stats, times)
        self._audit(batch, trained, stats)
        self.step_logger.log(self.step_no, {**stats, "tokens_per_s": self.status.tokens_per_s})
        if self.source is not None:  # rollouts held until the next commit must not be reclaimed meanwhile
            self.io.call(self.source.keepalive())
        return stats

    def _stopping(self) -> None:
        self.stopped = True
        log.info("stopping at step %d (a stop was requested)", self.step_no)
        return None

    def _settle(self, trained: list[Group], stale: list[Group]) -> None:
        """Rank 0: tell the feeder which prompts were trained; stale groups are acknowledged now and (when the
        trainer feeds the prompts) their prompts fed again."""
        if self.source is None:
            return
        if stale:
            self.io.call(self.source.drop(stale, forget=self.feeder is not None))
        if self.feeder is not None:
            self.io.call(self.feeder.on_trained(g[0].prompt_id for g in trained))
            if stale:
                self.io.call(self.feeder.on_stale(g[0].prompt_id for g in stale))

    # -- 8: publish, checkpoint, ack --------------------------------------------------------------

    def _publish_and_checkpoint(self) -> None:
        cfg = self.config
        if self.step_no % cfg.publish.every_steps == 0 or self.step_no == cfg.max_steps:
            target = publish_weights(
                self.root,
                self.tokenizer_dir,
                cfg.publish.uri,
                self.step_no,
                cfg.publish.keep_last,
                self.info.is_main,
                cfg.publish.prune_grace_s,
            )
            self.version = self.step_no
            if self.source is not None:
                self.io.call(self.source.announce(self.version, str(target.resolve()), self.step_no, time.time()))
                self.metrics.policy_version.set(self.version)
        if self.step_no % cfg.checkpoint.every_steps == 0 or self.step_no == cfg.max_steps:
            self.checkpoint()

    def _audit(self, batch: Batch, trained: list[Group], stats: dict[str, float]) -> None:
        """Rank 0 appends the step's statistics, the rollouts it trained (ids and sample keys), the policy versions
        of the step's groups and the rollouts dropped as stale to steps.jsonl."""
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
            "rollouts": [r.rollout_id for g in trained for r in g],
            "sample_keys": [sample_key(r) for g in trained for r in g],
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
        m.observe_teacher(stats)
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
        """An eval round (of the policy version it names, at `step`) finished: into the status page, the metrics
        and the step log."""
        self.status.eval = report
        self.status.evals.append(report)
        self.metrics.eval_reward.set(report["mean_reward"])
        self.metrics.eval_pass_at_1.set(report["pass_at_1"])
        self.metrics.eval_divergence.set(report["divergence"])
        self.step_logger.log(step, report, prefix="eval")

    def close(self) -> None:
        """Flush the step loggers (the parts given to the constructor are the caller's to close)."""
        self.step_logger.close()


def _key_of_rollout_id(rollout_id: str) -> str:
    """The sample key of a worker-named rollout id `{prompt_id}@{entry}/{sample}` (checkpoints before sample keys
    listed rollout ids)."""
    head, _, index = rollout_id.rpartition("/")
    prompt_id = head.rpartition("@")[0] or head
    return f"{prompt_id}/{index}"
