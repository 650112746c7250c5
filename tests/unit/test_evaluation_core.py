"""The evaluation core (`student_trainer.evaluation`) is the one implementation: one log-prob floor for the sampled
reverse KL everywhere, the trainer's eval rounds and `opd eval` agree on it, and the library intervals match
their closed forms.

Tolerances: float64 sums of at most a few hundred terms, so 1e-12 relative; the Wilson bounds from scipy and
from the closed form differ only by float64 rounding of the normal quantile round trip (z -> level -> z).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from student_trainer.evaluation import (
    LOGPROB_FLOOR,
    StudentTokenStats,
    bootstrap_ratio_interval,
    divergences,
    sampled_reverse_kl,
    wilson_interval,
)
from student_trainer.groups.eval import eval_report
from student_trainer.loss.config import LossConfig
from tests.fixtures.rollout import make_rollout

pytestmark = pytest.mark.timeout(60)


def test_the_floor_is_the_losses_default_floor() -> None:
    assert LossConfig().logprob_floor == LOGPROB_FLOOR


def test_the_sampled_reverse_kl_floors_both_sides() -> None:
    got = sampled_reverse_kl(np.array([-1.0, -200.0, -np.inf]), np.array([-np.inf, -2.0, -300.0]))
    np.testing.assert_array_equal(got, [-1.0 - LOGPROB_FLOOR, LOGPROB_FLOOR + 2.0, 0.0])


def test_an_eval_round_and_opd_eval_give_the_same_divergence_for_a_teacher_log_prob_of_minus_infinity() -> None:
    record = make_rollout(0, num_tokens=6)
    record.behaviour_logprobs = np.array([-0.5, -1.0, -2.0, -0.1, -3.0, -0.7], np.float32)
    teacher = np.array([-0.4, -np.inf, -2.5, -0.2, -150.0, -0.9], np.float32)
    scores = {record.rollout_id: SimpleNamespace(token_logprobs=teacher, topk_ids=None)}
    round_report = eval_report([record], scores)
    empty = np.zeros((6, 0))
    student = StudentTokenStats(record.behaviour_logprobs, empty, np.zeros(6), np.zeros(6, np.int64))
    reply = SimpleNamespace(token_logprobs=teacher, topk_ids=np.zeros((6, 0), np.int64))
    opd_eval = divergences(student, reply)["reverse_kl_sampled"].mean()
    assert math.isfinite(round_report["divergence"])
    assert round_report["divergence"] == pytest.approx(opd_eval, rel=1e-12)
    floored = np.maximum(record.behaviour_logprobs.astype(np.float64), -100) - np.maximum(teacher, -100)
    assert round_report["divergence"] == pytest.approx(floored.mean(), rel=1e-12)


def _wilson_closed_form(s: int, n: int, z: float) -> tuple[float, float]:
    p, z2 = s / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("n", [1, 3, 10, 57])
def test_the_library_wilson_interval_is_the_closed_form(n: int) -> None:
    for s in range(1, n):
        for z in (1.0, 1.959963984540054, 2.5758):
            lo, hi = wilson_interval(s, n, z=z)
            want = _wilson_closed_form(s, n, z)
            assert lo == pytest.approx(want[0], rel=1e-9) and hi == pytest.approx(want[1], rel=1e-9)


def test_the_bootstrap_leaves_out_items_without_positions_and_handles_one_or_none() -> None:
    pairs = [(a, 10) for a in (0, 2, 5, 7, 10, 3, 9, 1)]
    assert bootstrap_ratio_interval(pairs + [(0, 0)] * 5) == bootstrap_ratio_interval(pairs)
    assert bootstrap_ratio_interval([(3, 4)]) == (0.75, 0.75)
    low, high = bootstrap_ratio_interval([(0, 0)])
    assert math.isnan(low) and math.isnan(high)
    low, high = bootstrap_ratio_interval(pairs, seed=1)
    assert low < sum(a for a, _ in pairs) / 80 < high
