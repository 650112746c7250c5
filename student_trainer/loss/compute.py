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

The data is validated here, at the boundary (`check_inputs` raises
`ValueError` naming what to change); inside the loss the inputs are trusted.
Formulas live in `divergences` and `weighting`; this module wires them and
knows no divergence by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from student_trainer.loss.planning import Denominators, RowPlan, plan_rows
from student_trainer.loss.registry import divergence
from student_trainer.loss.tiled import TiledPass, TileShape

__all__ = ["Denominators", "LossConfig", "LossInputs", "LossStats", "TeacherTensors", "compute_distillation_loss"]

BLOCK_BUDGET_CPU_MIB = 32.0  # block temporaries on CPU when loss.block_budget_mib is None (see LossConfig)


@dataclass(frozen=True)
class TeacherTensors:
    """Teacher log-probs for the N trained positions as tensors (any float dtype; taken as given): the loss's
    input, built from `teacher_server.client.TeacherScores` replies by `student_trainer.batching`."""

    token_logprobs: Tensor  # [N] log p_T(actual token)
    topk_ids: Tensor | None = None  # [N, k] int
    topk_logprobs: Tensor | None = None  # [N, k]
    tail_logprobs: Tensor | None = None  # [N] log of the teacher mass outside the top-k
    full_logprobs: Tensor | None = None  # [N, V], only when the teacher sent them
    temperature: float = 1.0  # the temperature the teacher applied

    @property
    def top_k(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[1])


@dataclass(frozen=True)
class LossInputs:
    """Per-token and per-sequence inputs; the rows of one sequence are contiguous."""

    target_ids: Tensor  # [N] int, the sampled (actual) tokens
    loss_weights: Tensor  # [N] float >= 0; 0 = no loss (tool tokens, padding), else a token weight s
    # (e.g. staleness) that scales the row's term; normalisations count rows, never sum these weights
    cu_seqlens: Tensor  # [S + 1] int: 0 = cu[0] <= ... <= cu[S] = N
    group_ids: Tensor | None = None  # [S] int, samples of one prompt share an id
    rewards: Tensor | None = None  # [S] float; NaN = no reward (None in the record): left out of reward terms
    behaviour_logprobs: Tensor | None = None  # [N] sampler log-probs (after temperature)
    # Group-level quantities computed over whole groups before a split (`planning.sequence_weights`);
    # None: computed here from `rewards` and `group_ids`, which then must hold whole groups.
    sample_weights: Tensor | None = None  # [S] recipe sample weight r (reward softmax x pass rate)
    advantages: Tensor | None = None  # [S] GRPO advantage of each sequence
    reference_logprobs: Tensor | None = None  # [N] log p_ref(target) of the frozen initial student (KL penalty)


@dataclass
class LossStats:
    """Per-step statistics: means over kept tokens, nan when nothing defines them."""

    loss: float  # a * distill_loss + b * rl_loss
    distill_loss: float  # the distillation term before its weight a (computed even when a = 0)
    rl_loss: float  # the GRPO term before its weight b (0 when b = 0)
    mean_divergence: float  # per-token divergence (rkl_sampled: log p_S(y) - log p_T(y))
    student_entropy: float  # nats
    top1_agreement: float  # share of tokens where argmax p_S == argmax p_T (nan if k = 0)
    fraction_kept: float  # kept / valid tokens (TIP)
    num_tokens: int  # valid tokens (loss weight > 0)
    num_kept_tokens: int
    reverse_kl_weight: float  # schedule weight of reverse KL (fkl_to_rkl), else 1
    reference_kl: float = float("nan")  # mean KL-penalty estimate of KL(p_S || p_ref) over the RL rows (nan: off)


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


def check_inputs(
    hidden_NH: Tensor, weight_VH: Tensor, inputs: LossInputs, teacher: TeacherTensors, config: LossConfig
) -> None:
    """Raise ValueError if the tensors do not fit each other or the config."""
    n, v = _check_shapes(hidden_NH, weight_VH, inputs, teacher)
    _check_teacher_forms(teacher, config, v)
    _check_sequences(inputs, config, n)
    if teacher.temperature != config.teacher_temperature:
        raise ValueError(
            f"teacher scores were made at temperature {teacher.temperature}, but "
            f"loss.teacher_temperature is {config.teacher_temperature}: make them match"
        )


def _check_shapes(hidden_NH: Tensor, weight_VH: Tensor, inputs: LossInputs, teacher: TeacherTensors) -> tuple[int, int]:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"hidden [N, H] and lm-head weight [V, H] expected, got {tuple(hidden_NH.shape)} "
            f"and {tuple(weight_VH.shape)}"
        )
    n, v = hidden_NH.shape[0], weight_VH.shape[0]
    for name, tensor in (
        ("inputs.target_ids", inputs.target_ids),
        ("inputs.loss_weights", inputs.loss_weights),
        ("teacher.token_logprobs", teacher.token_logprobs),
        ("inputs.behaviour_logprobs", inputs.behaviour_logprobs),
        ("inputs.reference_logprobs", inputs.reference_logprobs),
        ("teacher.tail_logprobs", teacher.tail_logprobs),
    ):
        if tensor is not None and tuple(tensor.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(tensor.shape)}")
    if n and (int(inputs.target_ids.min()) < 0 or int(inputs.target_ids.max()) >= v):
        raise ValueError(f"inputs.target_ids must lie in [0, {v})")
    if n and float(inputs.loss_weights.min()) < 0:
        raise ValueError("inputs.loss_weights must be >= 0")
    if teacher.full_logprobs is not None and tuple(teacher.full_logprobs.shape) != (n, v):
        raise ValueError(f"teacher.full_logprobs must have shape [{n}, {v}], got {tuple(teacher.full_logprobs.shape)}")
    return n, v


def _check_teacher_forms(teacher: TeacherTensors, config: LossConfig, vocab_size: int) -> None:
    k = teacher.top_k
    if teacher.topk_ids is not None:
        if teacher.topk_logprobs is None or teacher.topk_logprobs.shape != teacher.topk_ids.shape:
            raise ValueError("teacher.topk_logprobs must have the shape of teacher.topk_ids [N, k]")
        if k > 0 and teacher.tail_logprobs is None:
            raise ValueError("teacher.tail_logprobs is required with a top-k (k > 0)")
        if k > vocab_size:
            raise ValueError(f"teacher top-k k={k} exceeds the vocabulary size {vocab_size}")
    over_buckets = not divergence(config.divergence).sampled
    if over_buckets and config.support == "topk" and k == 0:
        raise ValueError(
            f"divergence={config.divergence!r} with support='topk' needs the teacher's top-k log-probs, "
            "but the teacher sent k=0: request top_k > 0 from the teacher, use support='full' with "
            "full log-probs, or use divergence='rkl_sampled' (needs only the actual-token log-prob)"
        )
    if over_buckets and config.support == "full" and teacher.full_logprobs is None:
        raise ValueError(
            f"divergence={config.divergence!r} with support='full' needs teacher.full_logprobs; "
            "request full log-probs from the teacher or set support='topk'"
        )
    ts = config.token_selection
    if ts.enabled and ts.divergence_exponent > 0:
        if ts.jsd_support == "topk" and k == 0:
            raise ValueError(
                "token_selection.divergence_exponent > 0 with jsd_support='topk' needs the teacher's top-k "
                "(k > 0); set divergence_exponent=0 (entropy only) or request top_k > 0"
            )
        if ts.jsd_support == "full" and teacher.full_logprobs is None:
            raise ValueError("token_selection.jsd_support='full' needs teacher.full_logprobs")


def _check_sequences(inputs: LossInputs, config: LossConfig, n: int) -> None:
    cu = inputs.cu_seqlens
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() < 0).any()):
        raise ValueError(f"inputs.cu_seqlens must be non-decreasing from 0 to N={n}")
    num_seqs = cu.numel() - 1
    for name, tensor in (("inputs.sample_weights", inputs.sample_weights), ("inputs.advantages", inputs.advantages)):
        if tensor is not None and tuple(tensor.shape) != (num_seqs,):
            raise ValueError(f"{name} must have shape [{num_seqs}] (one per sequence), got {tuple(tensor.shape)}")
    needs_rewards = (config.rl_weight > 0 and inputs.advantages is None) or (
        (config.reward_softmax.enabled or config.pass_rate.enabled) and inputs.sample_weights is None
    )
    if needs_rewards:
        for name, tensor in (("inputs.rewards", inputs.rewards), ("inputs.group_ids", inputs.group_ids)):
            if tensor is None or tuple(tensor.shape) != (num_seqs,):
                raise ValueError(
                    f"{name} of shape [{num_seqs}] is required by rl_weight > 0, reward_softmax or pass_rate "
                    "(or pass inputs.sample_weights / inputs.advantages computed over whole groups)"
                )
        if inputs.rewards is not None and bool(inputs.rewards.isinf().any()):  # not None: checked just above
            raise ValueError(
                "inputs.rewards must be finite, or NaN for a sample without a reward (timed out, raised, no "
                "reference answer); got an infinite reward"
            )
    if config.kl.coef > 0 and inputs.reference_logprobs is None:
        raise ValueError(
            "loss.kl.coef > 0 needs inputs.reference_logprobs (the reference policy's log-probs of the targets); "
            "the trainer computes them when it holds the reference policy"
        )
    uses_pg = divergence(config.divergence).sampled or config.rl_weight > 0
    if uses_pg and config.policy_gradient.importance == "ppo_clip" and inputs.behaviour_logprobs is None:
        raise ValueError(
            "policy_gradient.importance='ppo_clip' needs inputs.behaviour_logprobs; send them or set importance='none'"
        )
