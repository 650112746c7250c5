"""`opd bench trl`'s arithmetic: the prompt order both sides train on, throughput over the span, the smoothed
divergence curve and the time at which it reaches a level (no process started, no model loaded)."""

from __future__ import annotations

import math

import pytest

from opd_apps.bench.trl_compare import Recipe, SideResult, _fill, compare, prompt_order, smoothed, time_to_reach

pytestmark = pytest.mark.timeout(60)


def test_prompt_order_is_the_same_list_for_a_seed_and_has_one_prompt_per_group():
    recipe = Recipe(steps=3, prompts_per_step=4)
    order = prompt_order(recipe)
    assert order == prompt_order(recipe)
    assert len(order) == 12 and len({row["id"] for row in order}) == 12
    assert [r["id"] for r in prompt_order(Recipe(steps=3, prompts_per_step=4, seed=1))] != [r["id"] for r in order]


def test_fill_counts_throughput_between_the_first_and_the_last_step():
    result = SideResult("x")
    # (end time, samples, tokens, divergence): the first step's samples and tokens are outside the span
    _fill(result, [(100.0, 16, 200.0, 3.0), (110.0, 16, 100.0, 2.0), (120.0, 16, 300.0, 1.0)])
    assert result.steps == 3 and result.trained_samples == 48 and result.trained_tokens == 600.0
    assert result.span_s == 20.0
    assert result.tokens_per_s == pytest.approx(400.0 / 20.0)
    assert result.samples_per_s == pytest.approx(32 / 20.0)
    assert result.curve == [(0.0, 3.0), (10.0, 2.0), (20.0, 1.0)]


def test_fill_with_one_step_has_no_span():
    result = SideResult("x")
    _fill(result, [(100.0, 16, 200.0, 3.0)])
    assert math.isnan(result.span_s) and result.tokens_per_s == 0.0


def test_smoothed_is_the_trailing_mean_and_time_to_reach_its_first_crossing():
    curve = [(0.0, 6.0), (1.0, 3.0), (2.0, 3.0), (3.0, 0.0), (4.0, 3.0)]
    assert smoothed(curve) == [(2.0, 4.0), (3.0, 2.0), (4.0, 2.0)]
    assert time_to_reach(curve, 2.0) == 3.0
    assert time_to_reach(curve, 4.0) == 2.0
    assert time_to_reach(curve, 1.0) is None


def test_compare_uses_the_level_both_sides_reach():
    fast, slow = SideResult("a"), SideResult("b")
    fast.curve = [(0.0, 3.0), (1.0, 3.0), (2.0, 3.0), (3.0, 0.0), (4.0, 0.0), (5.0, 0.0)]
    slow.curve = [(0.0, 3.0), (10.0, 3.0), (20.0, 3.0), (30.0, 1.5), (40.0, 1.5), (50.0, 1.5)]
    compare({"a": fast, "b": slow})
    # smoothed minima 0.0 and 1.5: the common level is 1.5, which a reaches at t=4 (mean of 3, 0, 0 = 1.0)
    assert fast.eval["common_level"] == slow.eval["common_level"] == 1.5
    assert fast.time_to_divergence_s == 4.0 and slow.time_to_divergence_s == 50.0
