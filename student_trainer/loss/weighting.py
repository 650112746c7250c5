"""Which tokens and samples count, and by how much.

Owns the weighting rules, as their papers publish them: TIP token selection
(arXiv 2604.14084), reward-softmax sample weights (the recipe's batch-wide
softmax of binarised rewards, or opd's per-group softmax of raw rewards), the
PACED (arXiv 2603.11178) pass-rate frontier weight and forward-then-reverse KL
schedule, GRPO group advantages, discounted sampled-token advantages, and the
reduction of per-token losses to per-row coefficients. All functions take
small per-token `[N]` or per-sequence `[S]` tensors and no logits; nothing
here needs a gradient.

A missing reward is NaN in a rewards tensor (a reward that timed out or
raised, or a prompt without a reference answer: `None` in the rollout
record), never 0: such a sample is left out of every reward-based term
(softmax, pass rate, GRPO mean and std) and gets the neutral value each rule
documents.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_trainer.loss.config import Normalization, ScheduleConfig


def sequence_index(cu_seqlens_S1: Tensor, num_rows: int) -> Tensor:
    """Sequence index [N] of every row, from cumulative lengths [S + 1] (0, ..., N)."""
    lengths_S = cu_seqlens_S1.diff().long()
    seq_ids_S = torch.arange(lengths_S.numel(), device=cu_seqlens_S1.device)
    seq_N = torch.repeat_interleave(seq_ids_S, lengths_S, output_size=num_rows)
    return seq_N


def _groups(group_ids_S: Tensor) -> tuple[Tensor, int]:
    _, inverse_S = torch.unique(group_ids_S, return_inverse=True)
    return inverse_S, int(inverse_S.max().item()) + 1 if inverse_S.numel() else 0


def _group_sum(values_S: Tensor, inverse_S: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values_S.dtype, device=values_S.device).index_add_(0, inverse_S, values_S)


def scored(rewards_S: Tensor) -> Tensor:
    """[S] bool: the sample has a reward. NaN marks a missing one (timed out, raised, no reference answer)."""
    return ~rewards_S.isnan()


def binarised(rewards_S: Tensor, threshold: float) -> Tensor:
    """[S] 1.0 where reward > `threshold` (correct), else 0.0; NaN (no reward) stays NaN."""
    correct_S = (rewards_S > threshold).to(rewards_S.dtype)
    return torch.where(scored(rewards_S), correct_S, rewards_S)


def batch_reward_softmax_weights(rewards_S: Tensor, beta: float) -> Tensor:
    """Sample weights [S] over the whole batch: w_i = n softmax(r / beta)_i over the n scored samples.

    The recipe's reward-weighted distillation (OPSD on verl), fed binarised
    rewards (`binarised`): the weights average 1 over the scored samples, so
    sum_i w_i l_i / n equals the recipe's sum_i w_i l_i / sum_i w_i with w its
    softmax. A sample without a reward (NaN) is left out of the softmax and
    weighs 1, the scored samples' mean.
    """
    ok_S = scored(rewards_S)
    weights_S = torch.ones_like(rewards_S, dtype=torch.float64)
    n = int(ok_S.sum().item())
    if n:
        scaled = rewards_S.double()[ok_S] / beta
        weights_S[ok_S] = torch.softmax(scaled, dim=0) * n
    return weights_S.to(rewards_S.dtype)


def reward_softmax_weights(rewards_S: Tensor, group_ids_S: Tensor, beta: float) -> Tensor:
    """Sample weights [S] within each group g: w_i = n_g softmax(r / beta)_i over the group's n_g scored samples.

    The `group_raw` form of reward weighting (opd's first one, on raw
    rewards); the weights of a group's scored samples average 1. A sample
    without a reward (NaN) is left out of its group's softmax and weighs 1.
    """
    inverse_S, num_groups = _groups(group_ids_S)
    ok_S = scored(rewards_S)
    scaled_S = torch.where(ok_S, rewards_S.double() / beta, -math.inf)
    group_max_G = torch.full((num_groups,), -math.inf, dtype=scaled_S.dtype, device=scaled_S.device)
    group_max_G = group_max_G.scatter_reduce(0, inverse_S, scaled_S, reduce="amax")
    exp_S = torch.where(ok_S, (scaled_S - group_max_G[inverse_S]).exp(), 0.0)
    sizes_G = _group_sum(ok_S.double(), inverse_S, num_groups)
    total_G = _group_sum(exp_S, inverse_S, num_groups)
    weights_S = torch.where(ok_S, exp_S / total_G[inverse_S].clamp(min=1e-300) * sizes_G[inverse_S], 1.0)
    return weights_S.to(rewards_S.dtype)


def pass_rates(rewards_S: Tensor, group_ids_S: Tensor, threshold: float = 0.0) -> Tensor:
    """Empirical pass rate [S] of each sample's group: share of its scored samples with reward > `threshold`.
    Samples without a reward (NaN) are not counted; a group with none scored has pass rate NaN."""
    inverse_S, num_groups = _groups(group_ids_S)
    ok_S = scored(rewards_S)
    passed_S = (ok_S & (rewards_S > threshold)).double()
    sizes_G = _group_sum(ok_S.double(), inverse_S, num_groups)
    rates_G = _group_sum(passed_S, inverse_S, num_groups) / sizes_G  # 0 / 0 = NaN: nothing scored
    return rates_G[inverse_S]


def pass_rate_weights(
    rewards_S: Tensor,
    group_ids_S: Tensor,
    alpha: float,
    beta: float,
    floor: float,
    normalize: bool = False,
    threshold: float = 0.0,
) -> Tensor:
    """Prompt weights [S] of PACED (arXiv 2603.11178): w(p) = max(p^alpha (1 - p)^beta, floor).

    p is the group's pass rate over its scored samples (`pass_rates`); a group
    that always or never passes (p = 1 or 0) gets weight 0 (for alpha, beta > 0)
    unless `floor` > 0. `normalize` divides the weights by their mean over the
    batch's samples (when it is > 0), so they average 1: PACED then reshapes the
    step across prompts instead of shrinking it (unnormalised, w <= 1/4 for
    alpha = beta = 1, a 4x or larger cut of the effective learning rate).
    A group with no scored sample has no p: its samples weigh the mean of the
    others' weights (1 when normalised; 1 when no sample has a p or that mean is 0).
    """
    p_S = pass_rates(rewards_S, group_ids_S, threshold)
    known_S = ~p_S.isnan()
    weights_S = (p_S.pow(alpha) * (1.0 - p_S).pow(beta)).clamp(min=floor)
    mean = float(weights_S[known_S].mean().item()) if bool(known_S.any()) else 0.0
    if normalize and mean > 0:
        weights_S, mean = weights_S / mean, 1.0
    weights_S = torch.where(known_S, weights_S, mean if mean > 0 else 1.0)
    return weights_S.to(rewards_S.dtype)


def grpo_advantages(
    rewards_S: Tensor, group_ids_S: Tensor, scale_by_std: bool, std_epsilon: float, singleton: str = "zero"
) -> Tensor:
    """Group-normalised advantages [S] of GRPO (Shao et al. 2024, DeepSeekMath):

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     (std: unbiased, as TRL)
        A_i = r_i - mean_g(r)                            (scale_by_std=False, Dr. GRPO)

    over each group's scored samples; a sample without a reward (NaN) has
    advantage 0 and does not enter its group's mean or std. A group of one
    scored sample has advantage 0 (`singleton="zero"`), or, as verl's
    `compute_grpo_outcome_advantage` (mean 0, std 1 for a group of one),
    r / (1 + eps) (r with scale_by_std=False) under `singleton="reward"`.
    """
    inverse_S, num_groups = _groups(group_ids_S)
    ok_S = scored(rewards_S)
    r_S = torch.where(ok_S, rewards_S.double(), 0.0)
    sizes_G = _group_sum(ok_S.double(), inverse_S, num_groups)
    means_G = _group_sum(r_S, inverse_S, num_groups) / sizes_G.clamp(min=1)
    centred_S = torch.where(ok_S, r_S - means_G[inverse_S], 0.0)
    if scale_by_std:
        var_G = _group_sum(centred_S.square(), inverse_S, num_groups) / (sizes_G - 1).clamp(min=1)
        centred_S = centred_S / (var_G.sqrt()[inverse_S] + std_epsilon)
    if singleton == "reward":
        alone_S = ok_S & (sizes_G[inverse_S] == 1)
        centred_S = torch.where(alone_S, r_S / (1.0 + std_epsilon) if scale_by_std else r_S, centred_S)
    return centred_S.to(rewards_S.dtype)


def discounted_returns(values_N: Tensor, cu_seqlens_S1: Tensor, discount: float) -> Tensor:
    """R_i = sum_{j >= i, same sequence} discount^(j - i) x_j, per sequence, [N].

    Distance counts positions (masked tool tokens included, with x = 0 there).
    discount = 0 returns x itself (the per-token advantage of on-policy
    distillation, Thinking Machines 2025).
    """
    if discount == 0.0:
        return values_N.clone()
    values = values_N.detach().double().cpu().tolist()
    out = [0.0] * len(values)
    for start, end in zip(cu_seqlens_S1[:-1].tolist(), cu_seqlens_S1[1:].tolist(), strict=True):
        running = 0.0
        for i in range(end - 1, start - 1, -1):
            running = values[i] + discount * running
            out[i] = running
    return torch.tensor(out, dtype=values_N.dtype, device=values_N.device)


def reverse_kl_weight(schedule: ScheduleConfig, step: int) -> float:
    """Weight w of reverse KL in (1 - w) forward KL + w reverse KL at `step` (PACED).

    switch: w = 0 before `switch_step`, 1 from it on.
    linear: w = clip((step - blend_start_step) / (blend_end_step - blend_start_step), 0, 1).
    """
    if schedule.mode == "switch":
        return 1.0 if step >= schedule.switch_step else 0.0
    span = schedule.blend_end_step - schedule.blend_start_step
    return min(1.0, max(0.0, (step - schedule.blend_start_step) / span))


def tip_weights(
    entropy_N: Tensor, jsd_N: Tensor | None, vocab_size: int, entropy_exponent: float, divergence_exponent: float
) -> Tensor:
    """TIP token weights [N] (arXiv 2604.14084): w = e^alpha * d^gamma, with
    e = H(p_S) / ln V and d = JSD(p_S, p_T) / ln 2, both in [0, 1].

    `jsd_N` may be None only when gamma = 0 (entropy-only selection).
    """
    weight_N = (entropy_N / math.log(vocab_size)).clamp(0.0, 1.0).pow(entropy_exponent)
    if divergence_exponent != 0.0:
        assert jsd_N is not None, "TIP with divergence_exponent > 0 needs the JSD per token"
        weight_N = weight_N * (jsd_N / math.log(2.0)).clamp(0.0, 1.0).pow(divergence_exponent)
    return weight_N


def num_kept(num_valid: int, keep_fraction: float) -> int:
    """Tokens TIP keeps of `num_valid`: floor(rho * n + 1/2), at least 1 (0 when n = 0)."""
    if num_valid == 0:
        return 0
    return min(num_valid, max(1, math.floor(keep_fraction * num_valid + 0.5)))


def select_tokens(weight_N: Tensor, valid_N: Tensor, keep_fraction: float, generator: torch.Generator) -> Tensor:
    """Keep `num_kept(n_valid, rho)` valid tokens, drawn without replacement
    with probability proportional to `weight_N`; returns a bool mask [N].

    Tokens of weight 0 are drawn only once every positive-weight token is kept.
    """
    valid_idx = valid_N.nonzero().flatten().cpu()
    num_keep = num_kept(valid_idx.numel(), keep_fraction)
    keep_N = torch.zeros_like(valid_N, dtype=torch.bool)
    if valid_idx.numel() == 0:
        return keep_N
    w = weight_N.detach().double().cpu()[valid_idx].clamp(min=0.0)
    w = torch.where(w > 0, w, w[w > 0].min() * 1e-12 if bool((w > 0).any()) else torch.ones_like(w))
    drawn = torch.multinomial(w, num_keep, replacement=False, generator=generator)
    keep_N[valid_idx[drawn].to(keep_N.device)] = True
    return keep_N


def micro_batch_renormalised(weights_S: Tensor, counted_S: Tensor) -> Tensor:
    """The recipe's per-micro-batch renormalisation of sample weights [S] (`reward_softmax.form=micro_batch`).

    r_i = w_i * n / sum_j w_j over the micro-batch's S sequences, n the number
    with a counted row (`counted_S`, 0/1): under sequence_mean with the
    micro-batch's own D = n, sum_i r_i m_i / n = sum_i w_i m_i / sum_i w_i, the
    recipe's loss (`opd_worker.py`; m_i a sequence's token mean, a sequence
    without a counted row adding 0 to the numerator and w_i to the sum).
    """
    total = float(weights_S.sum().item())
    if total <= 0.0:
        return weights_S.clone()
    return weights_S * (float(counted_S.sum().item()) / total)


def row_coefficients(
    row_weight_N: Tensor, counted_N: Tensor, seq_N: Tensor, num_seqs: int, mode: Normalization, denominator: float
) -> Tensor:
    """Per-row coefficients c [N] so that the loss is sum_i c_i l_i = sum_i s_i r_i l_i / D.

    token_mean:    c_i = u_i / D
    sequence_mean: c_i = u_i / (n_seq(i) * D), n_seq(i) = counted rows of row i's sequence
                   (l_i of a sequence is the mean of its counted rows' terms)
    sum:           c_i = u_i
    with u the row weights (token weight s x kept x sample weight r), `counted_N`
    the 0/1 rows that count (valid and kept) and D = `denominator`, an
    unweighted count (`count_rows`). No normalisation divides by the weights,
    so none cancels: a stale factor s scales its rows' share of the loss.
    """
    if mode == "sum":
        return row_weight_N.clone()
    if mode == "token_mean":
        return row_weight_N / max(denominator, 1.0)
    per_seq_S = torch.zeros(num_seqs, dtype=counted_N.dtype, device=counted_N.device).index_add_(0, seq_N, counted_N)
    denom_N = per_seq_S[seq_N] * max(denominator, 1.0)
    return torch.where(denom_N > 0, row_weight_N / denom_N.clamp(min=1e-30), torch.zeros_like(row_weight_N))


def count_rows(valid_N: Tensor, seq_N: Tensor, num_seqs: int, mode: Normalization) -> float:
    """The unweighted count D a micro-batch adds to the step's denominator, for rows `valid_N` (0/1).

    token_mean: rows counted; sequence_mean: sequences with a counted row; sum: 0
    (the step's D is 1 under sum, whatever it contains).
    """
    if mode == "sum":
        return 0.0
    if mode == "token_mean":
        return float(valid_N.sum().item())
    per_seq_S = torch.zeros(num_seqs, dtype=torch.float64, device=valid_N.device).index_add_(0, seq_N, valid_N.double())
    return float((per_seq_S > 0).sum().item())
