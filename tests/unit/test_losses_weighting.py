"""Specification of the weighting rules of `student_trainer/loss/weighting.py` (TIP, reward softmax, PACED, GRPO)."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.loss import weighting as wt
from student_trainer.loss.config import ScheduleConfig

pytestmark = pytest.mark.timeout(60)

GROUPS = torch.tensor([7, 7, 7, 3, 3])
REWARDS = torch.tensor([1.0, 0.0, 2.0, -1.0, 1.0], dtype=torch.float64)


def test_sequence_index_follows_cu_seqlens_including_empty_sequences():
    seq = wt.sequence_index(torch.tensor([0, 2, 2, 5]), 5)
    assert seq.tolist() == [0, 0, 2, 2, 2]


def test_reward_softmax_is_group_softmax_of_reward_over_beta_averaging_one():
    weights = wt.reward_softmax_weights(REWARDS, GROUPS, beta=0.5)
    first = torch.softmax(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64) / 0.5, 0) * 3
    second = torch.softmax(torch.tensor([-1.0, 1.0], dtype=torch.float64) / 0.5, 0) * 2
    torch.testing.assert_close(weights, torch.cat([first, second]))
    assert weights[:3].mean().item() == pytest.approx(1.0) and weights[3:].mean().item() == pytest.approx(1.0)


def test_reward_softmax_with_large_beta_is_uniform_and_survives_huge_rewards():
    torch.testing.assert_close(wt.reward_softmax_weights(REWARDS, GROUPS, beta=1e9), torch.ones(5, dtype=torch.float64))
    huge = wt.reward_softmax_weights(REWARDS * 1e4, GROUPS, beta=1.0)
    assert torch.isfinite(huge).all() and huge[2].item() == pytest.approx(3.0)


def test_pass_rate_is_share_of_group_with_positive_reward():
    torch.testing.assert_close(
        wt.pass_rates(REWARDS, GROUPS), torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.5, 0.5], dtype=torch.float64)
    )


def test_paced_weight_is_p_alpha_times_one_minus_p_beta():
    weights = wt.pass_rate_weights(REWARDS, GROUPS, alpha=2.0, beta=0.5, floor=0.0)
    want = [(2 / 3) ** 2 * (1 / 3) ** 0.5] * 3 + [0.25 * 0.5**0.5] * 2
    torch.testing.assert_close(weights, torch.tensor(want, dtype=torch.float64))


def test_paced_gives_all_pass_and_all_fail_groups_zero_unless_floored():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    assert wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.0).tolist() == [0.0] * 4
    assert wt.pass_rate_weights(rewards, groups, 1.0, 1.0, floor=0.05).tolist() == pytest.approx([0.05] * 4)


def test_grpo_advantages_are_group_centred_and_scaled_by_unbiased_std():
    adv = wt.grpo_advantages(REWARDS, GROUPS, scale_by_std=True, std_epsilon=1e-6)
    first = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(adv[:3], (first - 1.0) / (first.std() + 1e-6))
    torch.testing.assert_close(adv[3:], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (2**0.5 + 1e-6))


def test_grpo_without_std_scaling_only_centres_and_singletons_get_zero():
    adv = wt.grpo_advantages(REWARDS, GROUPS, scale_by_std=False, std_epsilon=1e-6)
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    single = wt.grpo_advantages(torch.tensor([5.0]), torch.tensor([0]), scale_by_std=True, std_epsilon=1e-6)
    assert single.tolist() == [0.0]


def test_equal_rewards_in_a_group_give_zero_advantage():
    adv = wt.grpo_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), True, 1e-6)
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_discounted_returns_stay_within_each_sequence():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    got = wt.discounted_returns(values, torch.tensor([0, 3, 5]), discount=0.5)
    assert got.tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 10 + 0.5 * 20, 20])
    assert torch.equal(wt.discounted_returns(values, torch.tensor([0, 5]), discount=0.0), values)


@pytest.mark.parametrize("step,want", [(0, 0.0), (99, 0.0), (100, 1.0), (5000, 1.0)])
def test_switch_schedule_is_forward_kl_before_the_step_and_reverse_from_it(step, want):
    assert wt.reverse_kl_weight(ScheduleConfig(mode="switch", switch_step=100), step) == want


@pytest.mark.parametrize("step,want", [(0, 0.0), (10, 0.0), (15, 0.25), (30, 1.0), (99, 1.0)])
def test_linear_schedule_blends_between_its_steps(step, want):
    schedule = ScheduleConfig(mode="linear", blend_start_step=10, blend_end_step=30)
    assert wt.reverse_kl_weight(schedule, step) == pytest.approx(want)


def test_tip_weight_is_normalised_entropy_and_jsd_to_their_exponents():
    entropy = torch.tensor([math.log(8.0), 0.5 * math.log(8.0), 0.0])
    jsd = torch.tensor([math.log(2.0), 0.25 * math.log(2.0), 0.1])
    got = wt.tip_weights(entropy, jsd, vocab_size=8, entropy_exponent=2.0, divergence_exponent=0.5)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.25 * 0.5, 0.0]))
    entropy_only = wt.tip_weights(entropy, None, vocab_size=8, entropy_exponent=1.0, divergence_exponent=0.0)
    torch.testing.assert_close(entropy_only, torch.tensor([1.0, 0.5, 0.0]))


def test_select_tokens_draws_only_valid_tokens_and_prefers_positive_weight():
    valid = torch.tensor([True, True, False, True, True, True])
    weight = torch.tensor([0.0, 1.0, 5.0, 2.0, 0.0, 3.0])
    for seed in range(20):
        kept = wt.select_tokens(weight, valid, keep_fraction=0.6, generator=torch.Generator().manual_seed(seed))
        assert kept.tolist() == [False, True, False, True, False, True]  # 3 of 5 valid, all of positive weight


def test_select_tokens_frequency_follows_weights():
    valid = torch.ones(3, dtype=torch.bool)
    weight = torch.tensor([1.0, 1.0, 8.0])
    counts = torch.zeros(3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        counts += wt.select_tokens(weight, valid, keep_fraction=0.34, generator=gen).float()
    assert counts[2] > 300 and counts[0] < 80 and counts.sum() == 400


def test_select_tokens_keeps_at_least_one_and_handles_no_valid_token():
    gen = torch.Generator().manual_seed(0)
    assert wt.select_tokens(torch.ones(4), torch.ones(4, dtype=torch.bool), 0.01, gen).sum() == 1
    assert wt.select_tokens(torch.ones(4), torch.zeros(4, dtype=torch.bool), 0.5, gen).sum() == 0
    assert wt.select_tokens(torch.zeros(4), torch.ones(4, dtype=torch.bool), 0.5, gen).sum() == 2


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sum"])
def test_row_coefficients_modes(mode):
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0])
    counted = torch.tensor([1.0, 1.0, 0.0, 1.0])
    seq = torch.tensor([0, 0, 1, 2])
    denominator = wt.count_rows(counted > 0, seq, 3, mode) if mode != "sum" else 1.0
    got = wt.row_coefficients(weights, counted, seq, 3, mode, denominator)
    want = {
        "token_mean": [1 / 3, 2 / 3, 0, 1 / 3],
        "sequence_mean": [1 / 4, 2 / 4, 0, 1 / 2],
        "sum": [1.0, 2.0, 0.0, 1.0],
    }[mode]
    assert got.tolist() == pytest.approx(want)
    assert wt.row_coefficients(weights * 0, counted * 0, seq, 3, mode, 0.0).tolist() == [0.0] * 4


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sum"])
def test_a_token_weight_scales_its_rows_and_never_cancels(mode):
    """Weights s on every row give s x the coefficients of weight 1 (D counts rows)."""
    counted = torch.tensor([1.0, 1.0, 0.0, 1.0])
    seq = torch.tensor([0, 0, 1, 2])
    denominator = wt.count_rows(counted > 0, seq, 3, mode) if mode != "sum" else 1.0
    fresh = wt.row_coefficients(counted, counted, seq, 3, mode, denominator)
    stale = wt.row_coefficients(0.25 * counted, counted, seq, 3, mode, denominator)
    assert stale.tolist() == pytest.approx((0.25 * fresh).tolist())
    assert fresh.sum() > 0


def test_count_rows_counts_tokens_or_live_sequences():
    valid = torch.tensor([True, True, False, True, False])
    seq = torch.tensor([0, 0, 1, 2, 3])
    assert wt.count_rows(valid, seq, 4, "token_mean") == 3
    assert wt.count_rows(valid, seq, 4, "sequence_mean") == 2
    assert wt.count_rows(valid, seq, 4, "sum") == 0


@pytest.mark.parametrize("n,rho,want", [(0, 0.5, 0), (1, 0.1, 1), (10, 0.5, 5), (7, 0.5, 4), (3, 1.0, 3)])
def test_num_kept_is_the_count_select_tokens_draws(n, rho, want):
    assert wt.num_kept(n, rho) == want
    if n:
        kept = wt.select_tokens(torch.rand(n), torch.ones(n, dtype=torch.bool), rho, torch.Generator().manual_seed(0))
        assert int(kept.sum()) == want
