"""Distillation loss of the student trainer: the one entry point the trainer calls.

Owns `compute_distillation_loss` and the data that crosses it: the teacher's
scores (`TeacherTensors`, mirroring the gRPC Score reply of protos/teacher.proto), the
per-token and per-sequence inputs (`LossInputs`) and the statistics returned
(`LossStats`, plain numbers; logging them is the trainer's job). A step reads:

1. validate shapes and that the teacher sent what the divergence needs;
2. plan the rows: optional no-grad pre-pass (TIP entropy / JSD, discounted
   advantages), token selection, sample weights, per-row coefficients,
   GRPO advantages (over samples with a reward only), the schedule's
   reverse-KL weight;
3. one chunked lm-head pass (`fused_linear`) whose chunk function evaluates
   `a * distill + b * rl` (rl: GRPO, plus its KL penalty to the reference
   policy when `inputs.reference_logprobs` is given) and its logits gradient
   block by block
   (`block_math`, eager or compiled, with the divergence the registry names;
   formulas in `divergences`), writing d logits back into the chunk, so the
   temporaries of the math are block-sized; or, with `loss.chunking=tiles`,
   the tiled pass (`tiled`: large row blocks x vocabulary tiles, the same
   formulas), whose per-row terms go into the same buffers;
4. statistics from the per-row buffers the chunk function filled.

Formulas live in `divergences` and `weighting`; this module wires them and
knows no divergence by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.loss.block_math import BlockRows, BlockSettings, BlockTerms, block_function, wants_compile
from student_trainer.loss.config import LossConfig
from student_trainer.loss.fused_linear import (
    chunk_rows,
    chunk_slices,
    compute_dtype,
    fused_linear_loss,
    fused_pass_loss,
)
from student_trainer.loss.inputs import LossInputs, LossStats, TeacherTensors, check_inputs
from student_trainer.loss.planning import Denominators, RowPlan, plan_rows
from student_trainer.loss.tiled import TiledPass, TileShape

__all__ = ["Denominators", "LossConfig", "LossInputs", "LossStats", "TeacherTensors", "compute_distillation_loss"]

BLOCK_BUDGET_CPU_MIB = 32.0  # block temporaries on CPU when loss.block_budget_mib is None (see LossConfig)


def compute_distillation_loss(
    hidden_NH: Tensor,
    lm_head_weight_VH: Tensor,
    inputs: LossInputs,
    teacher: TeacherTensors,
    config: LossConfig,
    step: int,
    lm_head_bias_V: Tensor | None = None,
    denominators: Denominators | None = None,
) -> tuple[Tensor, LossStats]:
    """loss = a * distill + b * rl over the N trained rows, and its statistics.

    hidden_NH: final hidden states [N, H] of the positions whose next token is
    `inputs.target_ids`; lm_head_weight_VH [V, H] (unsharded). Gradients flow to
    hidden, weight and bias through a chunked pass that never builds [N, V].
    Each term is sum_i s_i r_i l_i / D; `denominators` gives the step's D when
    these rows are one micro-batch of a larger step (`planning.count_denominators`
    added over all of them); None: D of these rows alone.
    """
    check_inputs(hidden_NH, lm_head_weight_VH, inputs, teacher, config)
    vocab = lm_head_weight_VH.shape[0]
    rows_per_chunk = chunk_rows(vocab, config.chunk_size, config.chunk_budget_mib)
    plan = plan_rows(
        hidden_NH, lm_head_weight_VH, lm_head_bias_V, inputs, teacher, config, step, rows_per_chunk, denominators
    )
    device, dtype = hidden_NH.device, compute_dtype(hidden_NH.dtype)
    budget = config.block_budget_mib or (BLOCK_BUDGET_CPU_MIB if device.type != "cuda" else None)
    block_rows = rows_per_chunk if budget is None else min(rows_per_chunk, chunk_rows(vocab, None, budget))
    fn = block_function(BlockSettings.of(config), wants_compile(config.compile, device))
    chunk_loss = _ChunkLoss(plan, inputs, teacher, config, dtype, block_rows, fn)
    active_N = plan.kept_N | (plan.rl_coef_N != 0)
    if config.chunking == "tiles":
        active_A = active_N.nonzero().squeeze(1)
        shape = TileShape.of(active_A.numel(), vocab, config.tile_vocab, config.tile_budget_mib)
        rows = chunk_loss.rows(None)
        tiled = TiledPass(BlockSettings.of(config), rows, active_A, plan.reverse_weight, shape, dtype)
        loss = fused_pass_loss(hidden_NH, lm_head_weight_VH, lm_head_bias_V, tiled)
        assert tiled.terms is not None, "set by the pass just run"
        chunk_loss.record(tiled.terms, active_A)
    else:
        chunks = chunk_slices(active_N, rows_per_chunk)
        loss = fused_linear_loss(hidden_NH, lm_head_weight_VH, lm_head_bias_V, chunk_loss, chunks)
    return loss, chunk_loss.stats(plan, config)


class _ChunkLoss:
    """Chunk function: a * distill + b * rl on one chunk, block by block; d logits written into the chunk."""

    def __init__(
        self, plan: RowPlan, inputs: LossInputs, teacher: TeacherTensors, config: LossConfig, dtype, block_rows: int, fn
    ) -> None:
        self.plan, self.inputs, self.teacher, self.config = plan, inputs, teacher, config
        self.block_rows, self.fn = block_rows, fn
        n, device = plan.valid_N.shape[0], plan.valid_N.device
        self.divergence_N = torch.zeros(n, dtype=dtype, device=device)
        self.entropy_N = torch.zeros(n, dtype=dtype, device=device)
        self.agree_N = torch.full((n,), math.nan, dtype=dtype, device=device)
        self.kl_N = torch.zeros(n, dtype=dtype, device=device)
        self.distill_sum = torch.zeros((), dtype=dtype, device=device)
        self.rl_sum = torch.zeros((), dtype=dtype, device=device)
        self.distill_scale_N = config.distill_weight * plan.distill_coef_N
        self.rl_scale_N = config.rl_weight * plan.rl_coef_N
        self.topk_ids = None if teacher.topk_ids is None else teacher.topk_ids.long()
        pg = config.policy_gradient
        self.behaviour = inputs.behaviour_logprobs if pg.importance != "none" else None

    def __call__(self, logits_CV: Tensor, rows: slice, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        loss = logits_CV.new_zeros(())
        for start in range(0, logits_CV.shape[0], self.block_rows):
            block_CV = logits_CV[start : start + self.block_rows]
            block = slice(rows.start + start, rows.start + start + block_CV.shape[0])
            terms = self.fn(block_CV, self.plan.reverse_weight, need_grad, self.rows(block))
            loss += self.record(terms, block)
            if need_grad and terms.dlogits_CV.data_ptr() != block_CV.data_ptr():
                block_CV.copy_(terms.dlogits_CV)
            del terms
        return loss, (logits_CV if need_grad else None)

    def rows(self, block: slice | None) -> BlockRows:
        """The per-row inputs of rows `block` (None: all rows, the tensors themselves)."""
        teacher, plan = self.teacher, self.plan

        def part(t: Tensor) -> Tensor:
            return t if block is None else t[block]

        def maybe(t: Tensor | None) -> Tensor | None:
            return None if t is None else part(t)

        return BlockRows(
            target_C=part(self.inputs.target_ids),
            distill_scale_C=part(self.distill_scale_N),
            rl_scale_C=part(self.rl_scale_N),
            teacher_token_C=part(teacher.token_logprobs),
            topk_ids_CK=maybe(self.topk_ids),
            topk_logprobs_CK=maybe(teacher.topk_logprobs),
            tail_C=maybe(teacher.tail_logprobs),
            full_CV=maybe(teacher.full_logprobs),
            distill_advantage_C=maybe(plan.distill_advantage_N),
            rl_advantage_C=maybe(plan.rl_advantage_N),
            behaviour_C=maybe(self.behaviour),
            reference_C=maybe(self.inputs.reference_logprobs),
        )

    def record(self, terms: BlockTerms, block: slice | Tensor) -> Tensor:
        """Keep one block's per-row terms (rows `block`: a slice or an index) and return its loss sum."""
        plan = self.plan
        self.divergence_N[block] = terms.divergence_C
        self.entropy_N[block] = terms.entropy_C
        self.agree_N[block] = terms.agree_C
        self.kl_N[block] = terms.kl_C
        self.distill_sum += (plan.distill_coef_N[block] * terms.distill_C).sum()
        self.rl_sum += (plan.rl_coef_N[block] * terms.rl_C).sum()
        return (self.distill_scale_N[block] * terms.distill_C).sum() + (self.rl_scale_N[block] * terms.rl_C).sum()

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
            reference_kl=_masked_mean(self.kl_N, plan.rl_coef_N != 0) if config.kl.coef > 0 else math.nan,
        )


def _masked_mean(values_N: Tensor, mask_N: Tensor) -> float:
    if not bool(mask_N.any()):
        return math.nan
    return float(values_N[mask_N].mean().item())
