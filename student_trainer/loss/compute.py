"""Distillation loss of the student trainer: the one entry point the trainer calls.

Owns `compute_distillation_loss` and the data that crosses it: the teacher's
scores (`TeacherScores`, mirroring the gRPC Score reply of protos/teacher.proto), the
per-token and per-sequence inputs (`LossInputs`) and the statistics returned
(`LossStats`, plain numbers; logging them is the trainer's job). A step reads:

1. validate shapes and that the teacher sent what the divergence needs;
2. plan the rows: optional no-grad pre-pass (TIP entropy / JSD, discounted
   advantages), token selection, sample weights, per-row coefficients,
   GRPO advantages, the schedule's reverse-KL weight;
3. one chunked lm-head pass (`fused_linear`) whose chunk function evaluates
   `a * distill + b * rl` and its logits gradient, with the divergence the
   registry names (`registry`, formulas in `divergences`);
4. statistics from the per-row buffers the chunk function filled.

Formulas live in `divergences` and `weighting`; this module wires them and
knows no divergence by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.loss import divergences as dv
from student_trainer.loss.config import LossConfig
from student_trainer.loss.fused_linear import chunk_rows, chunk_slices, compute_dtype, fused_linear_loss
from student_trainer.loss.inputs import LossInputs, LossStats, TeacherScores, check_inputs
from student_trainer.loss.planning import RowPlan, plan_rows
from student_trainer.loss.registry import DivergenceArgs, divergence

__all__ = ["LossConfig", "LossInputs", "LossStats", "TeacherScores", "compute_distillation_loss"]


def compute_distillation_loss(
    hidden_NH: Tensor,
    lm_head_weight_VH: Tensor,
    inputs: LossInputs,
    teacher: TeacherScores,
    config: LossConfig,
    step: int,
    lm_head_bias_V: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """loss = a * distill + b * rl over the N trained rows, and its statistics.

    hidden_NH: final hidden states [N, H] of the positions whose next token is
    `inputs.target_ids`; lm_head_weight_VH [V, H] (unsharded). Gradients flow to
    hidden, weight and bias through a chunked pass that never builds [N, V].
    """
    check_inputs(hidden_NH, lm_head_weight_VH, inputs, teacher, config)
    rows_per_chunk = chunk_rows(lm_head_weight_VH.shape[0], config.chunk_size, config.chunk_budget_mib)
    plan = plan_rows(hidden_NH, lm_head_weight_VH, lm_head_bias_V, inputs, teacher, config, step, rows_per_chunk)
    chunk_loss = _ChunkLoss(plan, inputs, teacher, config, hidden_NH.shape[0], compute_dtype(hidden_NH.dtype))
    active_N = plan.kept_N | (plan.rl_coef_N != 0)
    loss = fused_linear_loss(
        hidden_NH, lm_head_weight_VH, lm_head_bias_V, chunk_loss, chunk_slices(active_N, rows_per_chunk)
    )
    return loss, chunk_loss.stats(plan, config)


class _ChunkLoss:
    """Chunk function: a * distill + b * rl on one chunk, plus per-row statistics."""

    def __init__(self, plan: RowPlan, inputs: LossInputs, teacher: TeacherScores, config: LossConfig, n: int, dtype):
        self.plan, self.inputs, self.teacher, self.config = plan, inputs, teacher, config
        self.divergence = divergence(config.divergence)
        self.divergence_fn = self.divergence.function()
        self.args = DivergenceArgs(config.logprob_floor, config.jsd_beta, plan.reverse_weight)
        device = plan.valid_N.device
        self.divergence_N = torch.zeros(n, dtype=dtype, device=device)
        self.entropy_N = torch.zeros(n, dtype=dtype, device=device)
        self.agree_N = torch.full((n,), math.nan, dtype=dtype, device=device)
        self.distill_sum = torch.zeros((), dtype=dtype, device=device)
        self.rl_sum = torch.zeros((), dtype=dtype, device=device)

    def __call__(self, logits_CV: Tensor, rows: slice, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        cfg, plan = self.config, self.plan
        target_C = self.inputs.target_ids[rows]
        student = dv.student_chunk(logits_CV, cfg.student_temperature, cfg.logprob_floor)
        self.entropy_N[rows] = dv.entropy_rows(student)
        self.agree_N[rows] = _top1_agreement(student, self.teacher, rows)
        logp_C = student.logprobs_CV.gather(1, target_C.long()[:, None]).squeeze(1)
        distill_C, bucket_grad_CB, sampled_grad_C, buckets = self._distill(student, logp_C, rows)
        rl_C, rl_grad_C = self._rl(logp_C, rows)
        distill_scale_C = cfg.distill_weight * plan.distill_coef_N[rows]
        rl_scale_C = cfg.rl_weight * plan.rl_coef_N[rows]
        self.distill_sum += (plan.distill_coef_N[rows] * distill_C).sum()
        self.rl_sum += (plan.rl_coef_N[rows] * rl_C).sum()
        loss = (distill_scale_C * distill_C).sum() + (rl_scale_C * rl_C).sum()
        if not need_grad:
            return loss, None
        # Every term's gradient is linear in its row scale: scale first, chain once.
        if bucket_grad_CB is not None:
            bucket_grad_CB.mul_(distill_scale_C[:, None])
        if sampled_grad_C is not None:
            sampled_grad_C = sampled_grad_C * distill_scale_C
        if rl_grad_C is not None:
            rl_grad_C = rl_grad_C * rl_scale_C
            sampled_grad_C = rl_grad_C if sampled_grad_C is None else sampled_grad_C + rl_grad_C
        dlogits_CV = dv.logits_grad(student, buckets, bucket_grad_CB, target_C, sampled_grad_C, cfg.student_temperature)
        return loss, dlogits_CV

    def _distill(self, student: dv.StudentChunk, logp_C: Tensor, rows: slice):
        """Distillation rows: (surrogate loss [C], bucket grad | None, sampled grad | None, buckets)."""
        if self.divergence.sampled:
            divergence_C = self.divergence_fn(logp_C, self.teacher.token_logprobs[rows], self.args)
            self.divergence_N[rows] = divergence_C
            advantage_C = self.plan.distill_advantage_N
            advantage_C = -divergence_C if advantage_C is None else advantage_C[rows]
            loss_C, grad_C = dv.policy_gradient_rows(logp_C, advantage_C, *self._behaviour(rows))
            return loss_C, None, grad_C, None
        buckets = _distill_buckets(student, self.teacher, rows, self.config)
        loss_C, grad_CB = dv.bucket_divergence(buckets, self.divergence_fn, self.args)
        self.divergence_N[rows] = loss_C
        return loss_C, grad_CB, None, buckets

    def _rl(self, logp_C: Tensor, rows: slice) -> tuple[Tensor, Tensor | None]:
        if self.plan.rl_advantage_N is None:
            return torch.zeros_like(logp_C), None
        return dv.policy_gradient_rows(logp_C, self.plan.rl_advantage_N[rows], *self._behaviour(rows))

    def _behaviour(self, rows: slice) -> tuple[Tensor | None, float, float]:
        pg = self.config.policy_gradient
        behaviour = self.inputs.behaviour_logprobs
        if pg.importance == "none" or behaviour is None:
            return None, pg.clip_low, pg.clip_high
        return behaviour[rows], pg.clip_low, pg.clip_high

    def stats(self, plan: RowPlan, config: LossConfig) -> LossStats:
        kept_N = plan.kept_N
        num_kept = int(kept_N.sum().item())
        num_valid = int(plan.valid_N.sum().item())
        distill, rl = float(self.distill_sum.item()), float(self.rl_sum.item())
        return LossStats(
            loss=config.distill_weight * distill + config.rl_weight * rl,
            distill_loss=distill,
            rl_loss=rl,
            mean_divergence=_masked_mean(self.divergence_N, kept_N),
            student_entropy=_masked_mean(self.entropy_N, kept_N),
            top1_agreement=_masked_mean(self.agree_N, kept_N),
            fraction_kept=num_kept / num_valid if num_valid else math.nan,
            num_tokens=num_valid,
            num_kept_tokens=num_kept,
            reverse_kl_weight=plan.reverse_weight,
        )


def _masked_mean(values_N: Tensor, mask_N: Tensor) -> float:
    if not bool(mask_N.any()):
        return math.nan
    return float(values_N[mask_N].mean().item())


def _top1_agreement(student: dv.StudentChunk, teacher: TeacherScores, rows: slice) -> Tensor:
    """1.0 where the student's and teacher's most likely tokens agree, nan if unknown."""
    student_top_C = student.logprobs_CV.argmax(-1)
    if teacher.full_logprobs is not None:
        teacher_top_C = teacher.full_logprobs[rows].argmax(-1)
    elif teacher.top_k > 0:
        best_C1 = teacher.topk_logprobs[rows].argmax(-1, keepdim=True)
        teacher_top_C = teacher.topk_ids[rows].gather(1, best_C1).squeeze(1)
    else:
        return torch.full_like(student_top_C, math.nan, dtype=student.logprobs_CV.dtype)
    return (student_top_C == teacher_top_C.long()).to(student.logprobs_CV.dtype)


def _distill_buckets(student: dv.StudentChunk, teacher: TeacherScores, rows: slice, cfg: LossConfig) -> dv.Buckets:
    if cfg.support == "full":
        return dv.full_buckets(student, teacher.full_logprobs[rows])
    return dv.topk_buckets(
        student, teacher.topk_ids[rows], teacher.topk_logprobs[rows], teacher.tail_logprobs[rows], cfg.logprob_floor
    )
