"""Recipe: reward-weighted distillation as the recipe computes it, missing rewards, PACED normalisation.

Each rule is checked against a float64 value written out by hand, and end to end through
`compute_distillation_loss` against an autograd float64 reference of L = sum_i s_i r_i l_i / D (D an
unweighted count). Float64 throughout (u ~ 1.1e-16; a few dozen terms): rtol 1e-9 has orders of margin,
while a weight computed per group instead of per batch, or a missing reward taken as 0, moves values by >= 1e-2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protos.records import RolloutRecord
from student_trainer.batching import build_micro_batch
from student_trainer.loss import weighting as wt
from student_trainer.loss.compute import LossInputs, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.planning import count_denominators, sequence_weights
from tests.unit.test_losses_terms import CU_SEQLENS, GROUP_IDS, make_batch, reference, run, sampled_rkl_rows

pytestmark = pytest.mark.timeout(60)

NAN = math.nan
TOL = dict(rtol=1e-9, atol=1e-12)
# two groups; sample 3 has no reward (timed out / raised)
REWARDS = torch.tensor([1.0, 0.0, 0.7, NAN, -1.0, 1.0], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# ------------------------------------------------------------------ 1. the recipe's reward weights


def test_rewards_are_binarised_above_the_threshold_and_a_missing_one_stays_missing():
    got = wt.binarised(REWARDS, threshold=0.0)
    assert got[[0, 1, 2, 4, 5]].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0] and math.isnan(got[3].item())
    assert wt.binarised(REWARDS, threshold=0.8)[[0, 2]].tolist() == [1.0, 0.0]  # 0.7 is not above 0.8


def test_batch_softmax_is_over_every_scored_sample_of_the_batch_scaled_to_mean_one():
    beta = 0.5
    weights = wt.batch_reward_softmax_weights(wt.binarised(REWARDS, 0.0), beta)
    scored = [1.0, 0.0, 1.0, 0.0, 1.0]  # samples 0, 1, 2, 4, 5
    want = [5 * p for p in softmax([x / beta for x in scored])]
    torch.testing.assert_close(weights[[0, 1, 2, 4, 5]], torch.tensor(want, dtype=torch.float64), **TOL)
    assert weights[3].item() == 1.0  # no reward: out of the softmax, the scored samples' mean
    assert weights[[0, 1, 2, 4, 5]].mean().item() == pytest.approx(1.0, rel=1e-12)


def test_mean_one_weights_give_the_recipes_sum_w_l_over_sum_w():
    """sum_i w_i l_i / n with w = n softmax equals the recipe's sum_i p_i l_i / sum_i p_i, p the softmax."""
    losses = torch.tensor([0.3, 1.7, 0.2, 0.9, 2.5], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    w = wt.batch_reward_softmax_weights(rewards, beta=0.25)
    p = torch.softmax(rewards / 0.25, 0)
    assert (w * losses).sum().item() / 5 == pytest.approx(((p * losses).sum() / p.sum()).item(), rel=1e-12)


def test_the_batch_softmax_couples_groups_the_group_form_does_not():
    other = REWARDS.clone()
    other[4] = 1.0  # change group 1 only
    batch = [wt.batch_reward_softmax_weights(wt.binarised(r, 0.0), 1.0) for r in (REWARDS, other)]
    group = [wt.reward_softmax_weights(r, GROUPS, 1.0) for r in (REWARDS, other)]
    assert not torch.allclose(batch[0][:3], batch[1][:3])  # group 0's weights moved
    torch.testing.assert_close(group[0][:3], group[1][:3], rtol=0, atol=0)


def test_the_group_form_softmaxes_raw_rewards_within_groups_and_skips_missing_ones():
    weights = wt.reward_softmax_weights(REWARDS, GROUPS, beta=0.5)
    first = [3 * p for p in softmax([1.0 / 0.5, 0.0, 0.7 / 0.5])]
    second = [2 * p for p in softmax([-1.0 / 0.5, 1.0 / 0.5])]
    want = torch.tensor(first + [1.0] + second, dtype=torch.float64)
    torch.testing.assert_close(weights, want, **TOL)


def test_batch_binary_is_the_default_form_and_reads_loss_pass_threshold():
    config = LossConfig(reward_softmax={"enabled": True, "beta": 0.5}, pass_threshold=0.8)
    assert config.reward_softmax.form == "batch_binary"
    weights, advantages = sequence_weights(REWARDS, GROUPS, config)
    binary = [1.0, 0.0, 0.0, 0.0, 1.0]  # 0.7 is not above 0.8
    want = [5 * p for p in softmax([x / 0.5 for x in binary])]
    torch.testing.assert_close(weights[[0, 1, 2, 4, 5]], torch.tensor(want, dtype=torch.float64), **TOL)
    assert advantages is None


def test_the_weights_enter_the_step_loss_as_r_and_no_normalisation_divides_by_them():
    """L = sum_i r_i l_i / D over a micro-batch, D the count of valid tokens; r from the batch softmax."""
    hidden, weight, inputs, teacher = make_batch(seed=4)
    rewards = torch.tensor([1.0, NAN, 0.0, 1.0], dtype=torch.float64)
    inputs = LossInputs(inputs.target_ids, inputs.loss_weights, CU_SEQLENS, GROUP_IDS, rewards)
    cfg = LossConfig(reward_softmax={"enabled": True, "beta": 0.5}, chunk_size=5)
    r = [3 * p for p in softmax([1 / 0.5, 0.0, 1 / 0.5])]  # sequences 0, 2, 3 scored; 1 weighs 1
    r_S = torch.tensor([r[0], 1.0, r[1], r[2]], dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(4), CU_SEQLENS.diff())
    want = reference(hidden, weight, inputs, sampled_rkl_rows(teacher), row_weights=inputs.loss_weights * r_S[rows])
    got = run(hidden, weight, inputs, teacher, cfg)
    for g, w in zip(got[:3], want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


# ------------------------------------------------------------------ 2. a failed reward is not a zero


def test_pass_rates_count_only_scored_samples_and_a_group_without_any_has_none():
    rewards = torch.tensor([1.0, NAN, 0.0, NAN, NAN], dtype=torch.float64)
    rates = wt.pass_rates(rewards, torch.tensor([0, 0, 0, 1, 1]))
    assert rates[:3].tolist() == [0.5, 0.5, 0.5] and rates[3:].isnan().all()


def test_grpo_advantages_ignore_missing_rewards_which_get_advantage_zero():
    adv = wt.grpo_advantages(REWARDS, GROUPS, scale_by_std=True, std_epsilon=1e-6)
    first = torch.tensor([1.0, 0.0, 0.7], dtype=torch.float64)
    torch.testing.assert_close(adv[:3], (first - first.mean()) / (first.std() + 1e-6), **TOL)
    assert adv[3].item() == 0.0
    torch.testing.assert_close(adv[4:], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (2**0.5 + 1e-6), **TOL)
    taken_as_zero = wt.grpo_advantages(REWARDS.nan_to_num(0.0), GROUPS, True, 1e-6)
    assert not torch.allclose(adv[4:], taken_as_zero[4:])  # what the old 0.0 did to the group


def test_a_missing_reward_becomes_nan_in_a_micro_batch_never_zero():
    def record(i: int, reward: float | None) -> RolloutRecord:
        ids = np.array([1, 2, 3], np.int32)
        return RolloutRecord(
            f"r{i}", "p", "p", 2, "train", ids, ids, np.ones(3, np.uint8), np.zeros(3, np.float32), reward
        )

    mb = build_micro_batch([[record(0, 1.0), record(1, None)]], {})
    assert mb.inputs.rewards[0].item() == 1.0 and math.isnan(mb.inputs.rewards[1].item())


def test_the_grpo_term_trains_only_scored_samples_and_counts_only_them_in_d():
    """Sequence 1 has no reward: its tokens are distilled (a = 1) but get no GRPO term and are not in D_rl."""
    hidden, weight, inputs, teacher = make_batch(seed=2)
    rewards = torch.tensor([1.0, NAN, 0.5, 2.0], dtype=torch.float64)
    inputs = LossInputs(inputs.target_ids, inputs.loss_weights, CU_SEQLENS, GROUP_IDS, rewards)
    cfg = LossConfig(distill_weight=0.0, rl_weight=1.0, chunk_size=5)
    rows = torch.repeat_interleave(torch.arange(4), CU_SEQLENS.diff())
    scored_rows = (rows != 1).double()
    adv_S = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # group 0: one scored sample -> 0
    r = torch.tensor([0.5, 2.0], dtype=torch.float64)
    adv_S[2:] = (r - r.mean()) / (r.std() + 1e-6)
    u = inputs.loss_weights * scored_rows
    want = reference(
        hidden,
        weight,
        inputs,
        lambda s, s_y: -adv_S[rows] * torch.exp(s_y - s_y.detach()),
        row_weights=u,
        denom=u.sum(),
    )
    got = run(hidden, weight, inputs, teacher, cfg)
    for g, w in zip(got[:3], want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    counts = count_denominators(inputs, cfg)
    assert counts.rl == float(u.sum()) and counts.distill == float(inputs.loss_weights.sum())


def test_an_infinite_reward_is_refused_a_missing_one_is_not():
    hidden, weight, inputs, teacher = make_batch()
    cfg = LossConfig(rl_weight=1.0)
    bad = LossInputs(inputs.target_ids, inputs.loss_weights, CU_SEQLENS, GROUP_IDS, torch.tensor([1.0, math.inf, 0, 0]))
    with pytest.raises(ValueError, match="inputs.rewards must be finite, or NaN"):
        compute_distillation_loss(hidden, weight, bad, teacher, cfg, 0)
    ok = LossInputs(inputs.target_ids, inputs.loss_weights, CU_SEQLENS, GROUP_IDS, torch.tensor([1.0, NAN, 0, 0]))
    loss, _ = compute_distillation_loss(hidden, weight, ok, teacher, cfg, 0)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ 3. PACED, normalised to mean 1


def test_paced_normalised_weights_average_one_and_keep_their_ratios():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])  # p = 1/3, 3/4, 0
    raw = wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.05)
    want_raw = [2 / 9] * 3 + [3 / 16] * 4 + [0.05]
    torch.testing.assert_close(raw, torch.tensor(want_raw, dtype=torch.float64), **TOL)
    norm = wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.05, normalize=True)
    mean = sum(want_raw) / 8
    torch.testing.assert_close(norm, torch.tensor([x / mean for x in want_raw], dtype=torch.float64), **TOL)
    assert norm.mean().item() == pytest.approx(1.0, rel=1e-12)


def test_a_group_without_a_scored_sample_weighs_the_mean_of_the_others():
    rewards = torch.tensor([1.0, 0.0, NAN, NAN], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    raw = wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.0)
    assert raw.tolist() == pytest.approx([0.25] * 4)
    norm = wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.0, normalize=True)
    assert norm.tolist() == pytest.approx([1.0] * 4)
    zero = wt.pass_rate_weights(torch.tensor([1.0, 1.0, NAN], dtype=torch.float64), torch.tensor([0, 0, 1]), 1, 1, 0)
    assert zero.tolist() == [0.0, 0.0, 1.0]  # all-pass group dropped; the unknown one still distilled


def test_paced_normalises_by_default_and_the_threshold_is_the_losss():
    config = LossConfig(pass_rate={"enabled": True}, pass_threshold=0.5)
    assert config.pass_rate.normalize is True
    rewards = torch.tensor([0.7, 0.3, 0.3, 0.7], dtype=torch.float64)  # p = 1/2 and 1/2 at threshold 0.5
    weights, _ = sequence_weights(rewards, torch.tensor([0, 0, 1, 1]), config)
    assert weights.tolist() == pytest.approx([1.0] * 4)
