"""Per-row plan of one loss step: which rows count, with which coefficient.

Owns the step before the gradient pass: an optional no-grad chunked pre-pass
over the lm-head (student entropy and TIP's JSD for token selection, sampled
log-probs for discounted advantages), then token selection, sample weights,
the reduction coefficients of the distillation and RL terms, GRPO advantages
and the schedule's reverse-KL weight. The rules themselves live in
`student_trainer.loss.weighting`; the pre-pass reuses `fused_linear.run_chunks`
and the formulas of `student_trainer.loss.divergences`.

The step loss is L = sum_i s_i r_i l_i / D (s: token weight, e.g. staleness;
r: the recipe's sample weight; D: an unweighted count). A micro-batch alone
takes D from its own rows; a trainer step that spans micro-batches and ranks
adds `count_denominators` over all of them and passes the total, and computes
the group-level quantities (`sequence_weights`: reward softmax, pass rate,
GRPO advantages) over whole groups before any split, so a group cut across
micro-batches or ranks trains exactly as if it were not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from student_trainer.loss import divergences as dv
from student_trainer.loss import weighting as wt
from student_trainer.loss.config import LossConfig
from student_trainer.loss.fused_linear import chunk_slices, compute_dtype, run_chunks
from student_trainer.loss.registry import DivergenceArgs, divergence

if TYPE_CHECKING:
    from student_trainer.loss.compute import LossInputs, TeacherTensors


@dataclass
class RowPlan:
    """Per-row tensors [N] the chunk function reads (compute dtype)."""

    valid_N: Tensor  # bool, loss weight > 0
    kept_N: Tensor  # bool, valid and selected (TIP)
    distill_coef_N: Tensor  # c_i of the distillation term (before distill_weight a)
    rl_coef_N: Tensor  # c_i of the RL term (before rl_weight b), 0 when b = 0
    distill_advantage_N: Tensor | None  # discounted sampled-token advantage, if discount > 0
    rl_advantage_N: Tensor | None  # GRPO advantage of the row's sequence, if b > 0
    reverse_weight: float  # schedule weight of reverse KL


@dataclass(frozen=True)
class Denominators:
    """D of the distillation and the RL term (unweighted counts; 1 under `sum`)."""

    distill: float
    rl: float

    def __add__(self, other: Denominators) -> Denominators:
        return Denominators(self.distill + other.distill, self.rl + other.rl)


def count_denominators(inputs: LossInputs, config: LossConfig) -> Denominators:
    """What this micro-batch adds to the step's D: counted rows (token_mean; TIP's kept count, which
    depends only on the number of valid rows) or sequences with a valid row (sequence_mean); 0 under sum.
    The RL term counts only the rows of samples that have a reward (`rl_rows`)."""
    mode = config.normalization
    valid_N = inputs.loss_weights > 0
    num_seqs = inputs.cu_seqlens.numel() - 1
    seq_N = wt.sequence_index(inputs.cu_seqlens, valid_N.numel())
    distill = wt.count_rows(valid_N, seq_N, num_seqs, mode)
    rl = wt.count_rows(rl_rows(inputs, valid_N, seq_N), seq_N, num_seqs, mode)
    ts = config.token_selection
    if ts.enabled and mode == "token_mean":
        distill = float(wt.num_kept(int(distill), ts.keep_fraction))
    return Denominators(distill, rl)


def rl_rows(inputs: LossInputs, valid_N: Tensor, seq_N: Tensor) -> Tensor:
    """[N] bool: valid rows of samples with a reward (NaN in `inputs.rewards` = none); the GRPO term and its
    KL penalty train these only."""
    if inputs.rewards is None or inputs.rewards.numel() == 0:
        return valid_N
    return valid_N & wt.scored(inputs.rewards.to(valid_N.device))[seq_N]


def step_denominators(total: Denominators, config: LossConfig) -> Denominators:
    """The D to divide by, from counts added over every micro-batch of the step (1 under `sum`)."""
    return Denominators(1.0, 1.0) if config.normalization == "sum" else total


def micro_batch_denominators(
    counts: list[Denominators], step_total: Denominators, num_active: int, world_size: int, config: LossConfig
) -> list[Denominators]:
    """The D of each of a rank's micro-batches (`counts`: their own `count_denominators`).

    reduction='step': the step's D (`step_total`, counted over all micro-batches and ranks) for every one.
    reduction='micro_batch_mean' (the recipe's, verl): micro-batch j's own D times the rank's `num_active`
    (non-filler) micro-batches M times `world_size` W, so that with the trainer's backward of W x loss and
    FSDP's mean over ranks the step loss is mean over ranks of (1/M) sum_j (micro-batch j's normalised loss).
    """
    if config.reduction == "step":
        return [step_total] * len(counts)
    scale = float(max(num_active, 1) * world_size)
    own = [step_denominators(c, config) for c in counts]
    return [Denominators(d.distill * scale, d.rl * scale) for d in own]


def sequence_weights(
    rewards_S: Tensor, group_ids_S: Tensor, config: LossConfig, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor | None]:
    """Recipe sample weights r [S] (product of the enabled weightings; ones if none) and GRPO advantages [S]
    (None when rl_weight = 0), computed over whole groups: call it before groups are split. The batch-wide
    reward softmax and PACED's normalisation read every sample given: pass the whole step's. A missing
    reward is NaN (see `weighting`)."""
    num_seqs = rewards_S.numel()
    weights_S = torch.ones(num_seqs, dtype=dtype, device=rewards_S.device)
    rewards = rewards_S.to(dtype)
    rs = config.reward_softmax
    if rs.enabled and rs.form in ("batch_binary", "micro_batch"):  # micro_batch: renormalised in `plan_rows`
        weights_S = weights_S * wt.batch_reward_softmax_weights(wt.binarised(rewards, config.pass_threshold), rs.beta)
    elif rs.enabled:
        weights_S = weights_S * wt.reward_softmax_weights(rewards, group_ids_S, rs.beta)
    if config.pass_rate.enabled:
        pr = config.pass_rate
        weights_S = weights_S * wt.pass_rate_weights(
            rewards, group_ids_S, pr.alpha, pr.beta, pr.floor, pr.normalize, config.pass_threshold
        )
    advantages_S = None
    if config.rl_weight > 0:
        rl = config.rl
        advantages_S = wt.grpo_advantages(rewards, group_ids_S, rl.scale_by_std, rl.std_epsilon, rl.singleton)
    return weights_S, advantages_S


@dataclass
class RowScores:
    """No-grad per-row scores of the pre-pass, [N] (rows without loss weight stay 0)."""

    entropy_N: Tensor  # student entropy H(p_S), nats
    logp_N: Tensor  # student log-prob of the target token
    jsd_N: Tensor | None  # symmetric JSD(p_S, p_T) over TIP's support, when TIP needs it


def plan_rows(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    inputs: LossInputs,
    teacher: TeacherTensors,
    config: LossConfig,
    step: int,
    rows_per_chunk: int,
    denominators: Denominators | None = None,
) -> RowPlan:
    """Selection, weights, coefficients and advantages for one step (no gradient).

    `denominators`: the step's D over all micro-batches and ranks; None = this micro-batch's own.
    """
    dtype = compute_dtype(hidden_NH.dtype)
    n, num_seqs = hidden_NH.shape[0], inputs.cu_seqlens.numel() - 1
    seq_N = wt.sequence_index(inputs.cu_seqlens, n)
    token_w_N = inputs.loss_weights.to(dtype)
    valid_N = token_w_N > 0
    if denominators is None:
        denominators = step_denominators(count_denominators(inputs, config), config)
    pre = None
    if config.token_selection.enabled or config.discount > 0:
        pre = prescore_rows(hidden_NH, weight_VH, bias_V, inputs, teacher, config, valid_N, rows_per_chunk)
    kept_N = _select(pre, valid_N, weight_VH.shape[0], config, step)
    counted_N = kept_N.to(dtype)
    sample_w_S, rl_advantage_S = _sequence_terms(inputs, config, dtype)
    if config.reward_softmax.enabled and config.reward_softmax.form == "micro_batch" and num_seqs:
        counted_S = torch.zeros(num_seqs, dtype=dtype, device=counted_N.device).index_add_(0, seq_N, counted_N)
        sample_w_S = wt.micro_batch_renormalised(sample_w_S, (counted_S > 0).to(dtype))
    sample_w_N = sample_w_S[seq_N] if num_seqs else torch.ones_like(token_w_N)
    distill_advantage_N = None
    row = divergence(config.divergence)
    if config.discount > 0:  # a sampled-token divergence (LossConfig checks): reward -d per token, discounted
        assert pre is not None, "discount > 0 runs the pre-pass"
        per_token_N = -row.function()(pre.logp_N, teacher.token_logprobs, DivergenceArgs(config.logprob_floor))
        distill_advantage_N = wt.discounted_returns(per_token_N * valid_N, inputs.cu_seqlens, config.discount)
    rl_coef_N = torch.zeros_like(token_w_N)
    if config.rl_weight > 0:  # over the valid tokens of scored samples: no selection, no sample weights
        rl_N = rl_rows(inputs, valid_N, seq_N).to(dtype)
        rl_coef_N = wt.row_coefficients(token_w_N * rl_N, rl_N, seq_N, num_seqs, config.normalization, denominators.rl)
    return RowPlan(
        valid_N=valid_N,
        kept_N=kept_N,
        distill_coef_N=wt.row_coefficients(
            token_w_N * counted_N * sample_w_N, counted_N, seq_N, num_seqs, config.normalization, denominators.distill
        ),
        rl_coef_N=rl_coef_N,
        distill_advantage_N=distill_advantage_N,
        rl_advantage_N=None if rl_advantage_S is None else rl_advantage_S[seq_N],
        reverse_weight=wt.reverse_kl_weight(config.schedule, step) if row.scheduled else 1.0,
    )


def _sequence_terms(inputs: LossInputs, config: LossConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Sample weights [S] and GRPO advantages [S] | None: as given in `inputs`, else from its groups."""
    device = inputs.loss_weights.device
    weights_S, advantages_S = inputs.sample_weights, inputs.advantages
    needs_weights = config.reward_softmax.enabled or config.pass_rate.enabled
    if (weights_S is None and needs_weights) or (advantages_S is None and config.rl_weight > 0):
        rewards_S, group_ids_S = inputs.rewards, inputs.group_ids
        assert rewards_S is not None and group_ids_S is not None, "required here, checked by check_inputs"
        computed_w, computed_a = sequence_weights(rewards_S, group_ids_S, config, dtype)
        weights_S = computed_w if weights_S is None else weights_S
        advantages_S = computed_a if advantages_S is None else advantages_S
    if weights_S is None:
        weights_S = torch.ones(inputs.cu_seqlens.numel() - 1, dtype=dtype)
    if config.rl_weight == 0:
        advantages_S = None
    return weights_S.to(device, dtype), None if advantages_S is None else advantages_S.to(device, dtype)


def _select(pre: RowScores | None, valid_N: Tensor, vocab_size: int, config: LossConfig, step: int) -> Tensor:
    ts = config.token_selection
    if not ts.enabled:
        return valid_N.clone()
    assert pre is not None, "token selection runs the pre-pass"
    weight_N = wt.tip_weights(pre.entropy_N, pre.jsd_N, vocab_size, ts.entropy_exponent, ts.divergence_exponent)
    generator = torch.Generator().manual_seed(ts.seed + step)
    return wt.select_tokens(weight_N, valid_N, ts.keep_fraction, generator)


def prescore_rows(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    inputs: LossInputs,
    teacher: TeacherTensors,
    config: LossConfig,
    valid_N: Tensor,
    rows_per_chunk: int,
) -> RowScores:
    """No-grad chunked pass: student entropy, sampled log-prob and (if TIP needs it) JSD per row."""
    dtype = compute_dtype(hidden_NH.dtype)
    n = hidden_NH.shape[0]
    ts = config.token_selection
    want_jsd = ts.enabled and ts.divergence_exponent > 0
    out = RowScores(
        entropy_N=torch.zeros(n, dtype=dtype, device=hidden_NH.device),
        logp_N=torch.zeros(n, dtype=dtype, device=hidden_NH.device),
        jsd_N=torch.zeros(n, dtype=dtype, device=hidden_NH.device) if want_jsd else None,
    )

    def score_chunk(logits_CV: Tensor, rows: slice, need_grad: bool) -> tuple[Tensor, None]:
        student = dv.student_chunk(logits_CV, config.student_temperature, config.logprob_floor)
        out.entropy_N[rows] = dv.entropy_rows(student)
        out.logp_N[rows] = student.logprobs_CV.gather(1, inputs.target_ids[rows].long()[:, None]).squeeze(1)
        if out.jsd_N is not None:  # TIP's JSD wanted
            out.jsd_N[rows] = _tip_jsd(student, teacher, rows, config)
        return logits_CV.new_zeros(()), None

    with torch.no_grad():
        run_chunks(
            hidden_NH.detach(),
            weight_VH.detach(),
            None if bias_V is None else bias_V.detach(),
            score_chunk,
            chunk_slices(valid_N, rows_per_chunk),
        )
    return out


def _tip_jsd(student: dv.StudentChunk, teacher: TeacherTensors, rows: slice, config: LossConfig) -> Tensor:
    """Symmetric JSD(p_S, p_T) (beta = 1/2, at most ln 2) over TIP's support, [C]."""
    floor = config.logprob_floor
    if config.token_selection.jsd_support == "full":
        assert teacher.full_logprobs is not None, "checked by check_inputs"
        buckets = dv.full_buckets(student, teacher.full_logprobs[rows])
    else:
        assert teacher.topk_ids is not None and teacher.topk_logprobs is not None, "checked by check_inputs"
        buckets = dv.renormalised_topk(student, teacher.topk_ids[rows], teacher.topk_logprobs[rows], floor)
    jsd_C, _ = dv.jsd(buckets.student_CB, buckets.student_probs_CB, buckets.teacher_CB, DivergenceArgs(floor, 0.5))
    return jsd_C.clamp(min=0.0, max=math.log(2.0))
