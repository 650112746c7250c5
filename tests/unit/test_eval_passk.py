"""pass@k (against enumeration and exact fractions), the Wilson interval (hand-computed), diversity, eval flags."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from opd.config import ConfigError, load_config
from opd_apps.eval.config import EvalCommandConfig, normalize_argv
from student_trainer.evaluation.stats import (
    Z_95,
    default_ks,
    distinct_n,
    diversity,
    mean_pass_at_k,
    pass_at_k,
    wilson_interval,
)

pytestmark = pytest.mark.timeout(60)


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumerating_every_subset(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            # the product form rounds once per factor: at most n half-ulps of relative error
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), rel=1e-14, abs=1e-15)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(200, 1, 1), (500, 37, 50), (1000, 3, 100), (2000, 1900, 64), (10_000, 5, 1000)]
)
def test_pass_at_k_is_stable_for_large_n(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # exact big-integer binomials
    # c factors in [0, 1), each rounded once: relative error of the product <= c * 2^-53
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=max(c, 1) * 2**-52, abs=1e-16)


def test_pass_at_k_hand_computed_values() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples: every draw of k holds a correct one
    assert pass_at_k(3, 3, 1) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1), (0, 0, 1), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_leaves_out_prompts_with_fewer_than_k_samples() -> None:
    counts = [(4, 1), (4, 4), (1, 1)]
    assert mean_pass_at_k(counts, 1).value == pytest.approx((0.25 + 1 + 1) / 3)
    two = mean_pass_at_k(counts, 2)
    assert two.prompts == 2 and two.value == pytest.approx((0.5 + 1) / 2)
    assert mean_pass_at_k(counts, 8).value is None and mean_pass_at_k(counts, 8).prompts == 0


def test_default_ks() -> None:
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(10) == [1, 2, 4, 8, 10]


def test_wilson_interval_hand_computed() -> None:
    # 8 of 10, z = 1.96: p = 0.8, 1 + z^2/n = 1.38416, center = 0.99208 / 1.38416 = 0.716738,
    # half = 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581 -> (0.490157, 0.943319)
    lo, hi = wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.490157, abs=1e-6) and hi == pytest.approx(0.943319, abs=1e-6)
    # 0 of n: lower 0, upper z^2 / (n + z^2); 10 of 10 mirrors it
    z2 = Z_95**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)


def test_wilson_interval_is_symmetric_and_holds_the_estimate() -> None:
    for n in (1, 7, 50):
        for s in range(n + 1):
            lo, hi = wilson_interval(s, n)
            assert 0.0 <= lo <= s / n <= hi <= 1.0
            mirror = wilson_interval(n - s, n)
            assert lo == pytest.approx(1 - mirror[1], abs=1e-12) and hi == pytest.approx(1 - mirror[0], abs=1e-12)


def test_wilson_interval_refuses_bad_counts() -> None:
    with pytest.raises(ValueError, match="Wilson"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="Wilson"):
        wilson_interval(0, 0)


def test_distinct_n_counts_within_sequences_only() -> None:
    seqs = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 5)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 3)  # (a,b) (b,a) (a,b); never (a, a) across the two
    assert distinct_n([["x"]], 2) is None
    with pytest.raises(ValueError):
        distinct_n(seqs, 0)


def test_diversity_of_answers_and_words() -> None:
    d = diversity(["the answer is 1", "the answer is 1", "no idea", "two"], ["1", "1", None, "2"])
    assert d.answers == 3 and d.distinct_answers_share == pytest.approx(2 / 3)
    assert d.distinct_1 == pytest.approx(7 / 11)  # the answer is 1 x2, no idea, two: 11 words, 7 distinct
    assert d.distinct_2 == pytest.approx(4 / 7)  # (the answer) (answer is) (is 1) x2, (no idea)
    assert diversity(["a"], [None]).distinct_answers_share is None
    with pytest.raises(ValueError, match="one answer"):
        diversity(["a", "b"], ["1"])


def test_eval_flags_short_teacher_and_k_checks() -> None:
    argv = normalize_argv(["--model", "m", "--prompts", "p.jsonl", "--teacher", "h:1", "--sampling-n", "8"])
    config = load_config(EvalCommandConfig, argv, prog="opd eval", description="", env_prefix="OPD_EVAL__", environ={})
    assert config.teacher.addresses == ["h:1"] and config.pass_ks() == [1, 2, 4, 8]
    assert normalize_argv(["--teacher=h:2"]) == ["--teacher-addresses=h:2"]
    with pytest.raises(ConfigError, match="--sampling-n"):
        load_config(
            EvalCommandConfig,
            ["--model", "m", "--prompts", "p", "--ks", "1", "5"],
            prog="opd eval",
            description="",
            env_prefix="OPD_EVAL__",
            environ={},
        )
    with pytest.raises(ValueError, match="max_model_len"):
        EvalCommandConfig(model="m", prompts="p", sampling={"max_tokens": 64}, engine={"max_model_len": 64})
