"""One optimizer step on one rank's share of a batch: micro-batches, loss scaling, backward, clip, AdamW.

Owns the arithmetic that makes N ranks x M micro-batches equal one big batch:
the loss of every micro-batch is weighted by its share of the global number
of trained tokens (a token mean over the whole step), times the world size
because FSDP averages gradients over ranks; and every rank runs the same
number of forward/backward passes (FSDP's collectives), padding with
zero-weight copies. Skips the update when the gradient norm is not finite.
"""

from __future__ import annotations

import collections
import logging
import math

import torch
import torch.distributed as dist

from student_trainer.batching import (
    Group,
    MicroBatch,
    build_micro_batch,
    pack_groups,
    placeholder_scores,
    scores_to,
    teacher_scores_for,
)
from student_trainer.config import TrainerConfig
from student_trainer.loss.inputs import TeacherScores
from student_trainer.model import DistInfo, StudentLoss

log = logging.getLogger(__name__)
_STAT_KEYS = ("loss", "mean_divergence", "student_entropy", "top1_agreement", "fraction_kept")


class StepRunner:
    def __init__(
        self,
        root: StudentLoss,
        optimizer: torch.optim.Optimizer,
        scheduler,
        config: TrainerConfig,
        info: DistInfo,
        top_k: int,
        teacher_temperature: float,
    ) -> None:
        self.root, self.optimizer, self.scheduler = root, optimizer, scheduler
        self.config, self.info = config, info
        self.top_k, self.temperature = top_k, teacher_temperature

    def micro_batches(
        self, groups: list[Group], mine: list[Group], weights: dict[str, float]
    ) -> list[tuple[MicroBatch, float]]:
        """(micro-batch, scale); every rank gets the same count, padded with zero-weight copies."""
        bins = pack_groups(mine, self.config.batch.max_tokens_per_micro_batch)
        count = torch.tensor([len(bins)], device=self.info.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        filler = bins[-1] if bins else [groups[0]]
        zero = {r.rollout_id: 0.0 for g in filler for r in g}
        micro = [(build_micro_batch(b, weights), 1.0) for b in bins]
        micro += [(build_micro_batch(filler, zero), 0.0) for _ in range(int(count.item()) - len(bins))]
        return micro

    def forward_backward(
        self, groups: list[Group], mine: list[Group], weights: dict[str, float], scores: dict, step: int
    ) -> dict[str, float]:
        """Accumulate gradients of the step's token-mean loss; returns step statistics summed over ranks."""
        micro = self.micro_batches(groups, mine, weights)
        valid = torch.tensor(
            [sum(m.num_valid_tokens * s for m, s in micro)], dtype=torch.float64, device=self.info.device
        )
        dist.all_reduce(valid)
        total_valid = max(1.0, float(valid.item()))
        sums: dict[str, float] = collections.defaultdict(float)
        for mb, scale in micro:
            teacher = self._teacher_for(mb, scores)
            mb = mb.to(self.info.device)
            loss, stats = self.root(mb, teacher, step)
            weight = scale * mb.num_valid_tokens / total_valid
            (loss * weight * self.info.world_size).backward()  # FSDP averages over ranks
            for key in _STAT_KEYS:
                value = getattr(stats, key)
                if not math.isnan(value):
                    sums[key] += value * weight
            sums["tokens"] += stats.num_tokens * scale
        keys = sorted(sums)
        reduced = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(reduced)
        return dict(zip(keys, reduced.tolist(), strict=True))

    def _teacher_for(self, mb: MicroBatch, scores: dict) -> TeacherScores:
        if all(r.rollout_id in scores for r in mb.records):
            teacher = teacher_scores_for(mb.records, scores, self.temperature)
        else:  # a zero-weight filler of records another rank scored: placeholders, never weighted
            teacher = placeholder_scores(len(mb.rows_N), self.top_k, self.temperature)
        return scores_to(teacher, self.info.device)

    def optimizer_step(self) -> float:
        """Clip, then step unless the norm is not finite; returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.root.parameters(), self.config.optim.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            log.warning("optimizer step skipped: gradient norm is %s", norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm
