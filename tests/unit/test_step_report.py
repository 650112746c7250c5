"""The step report: one typed record per step, whose `stats()` is what steps.jsonl and the loggers always got."""

from __future__ import annotations

import math

import pytest

from student_trainer.report import StepReport, StepTimes

# What `StepRunner.forward_backward` returns for a step with a teacher, rewards and no tool episode.
RUNNER_STATS = {
    "loss": 0.5,
    "tokens": 24.0,
    "dropped_too_long": 0.0,
    "mean_divergence": 0.25,
    "student_entropy": 3.0,
    "teacher_p_sampled": 0.1,
    "rewards_scored": 2.0,
    "rewards_missing": 1.0,
    "pass_rate": 0.5,
    "tool_episodes": 0.0,
    "tool_tokens": 0.0,
    "tool_turns_mean": math.nan,
}


def test_stats_are_the_runner_statistics_plus_the_gradient_norm_and_the_times():
    times = StepTimes(data_wait_s=1.0, teacher_wait_s=0.5, compute_s=2.5)
    report = StepReport.build(3, 2, RUNNER_STATS, 1.5, times, dropped_stale=4, staleness=(0, 1))

    stats = report.stats()

    assert list(stats) == [*RUNNER_STATS, "grad_norm", "data_wait_s", "teacher_wait_s", "compute_s"]
    assert {k: v for k, v in stats.items() if k in RUNNER_STATS and v == v} == {
        k: v for k, v in RUNNER_STATS.items() if v == v
    }
    assert math.isnan(stats["tool_turns_mean"])  # measured as NaN stays NaN (steps.jsonl writes null)
    assert stats["grad_norm"] == 1.5 and stats["compute_s"] == 2.5
    assert report.tokens_per_s == 24.0 / 4.0
    assert report.dropped_stale == 4 and report.staleness == (0, 1)


def test_a_statistic_not_measured_is_left_out_and_reads_as_nan():
    stats = {k: v for k, v in RUNNER_STATS.items() if k not in ("mean_divergence", "teacher_p_sampled")}
    report = StepReport.build(1, 0, stats, 1.0, StepTimes())

    assert "mean_divergence" not in report.stats() and "teacher_p_sampled" not in report.stats()
    assert math.isnan(report.get("mean_divergence"))
    assert report.get("loss") == 0.5


def test_a_statistic_without_a_field_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"\['new_statistic'\].*report\.py"):
        StepReport.build(1, 0, {**RUNNER_STATS, "new_statistic": 1.0}, 1.0, StepTimes())
