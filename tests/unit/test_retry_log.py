"""RetryLog: every retry counted, at most one WARNING per address per interval, naming address, attempt and
the next delay."""

from __future__ import annotations

import logging

import pytest

from opd.retry import RetryLog, RetryStats
from opd.retry_metrics import RetryStatsCollector

pytestmark = pytest.mark.timeout(30)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_retries_are_all_counted_and_logged_at_a_bounded_rate(caplog):
    clock = _Clock()
    retries = RetryLog(logging.getLogger("test.retry"), "teacher call", interval_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.retry")
    for attempt in range(1, 31):  # 30 retries over 15 s against one address
        retries.note("10.0.0.1:50051", attempt, 0.5, ConnectionError("refused"), reason="UNAVAILABLE")
        clock.now += 0.5
    retries.note("10.0.0.2:50051", 1, 0.05, "queue full", reason="RESOURCE_EXHAUSTED")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    first = [line for line in lines if "10.0.0.1:50051" in line]
    assert len(first) == 2  # at t=100 and t=110 (the 21st retry); retries 2-20 and 22-30 held back
    assert first[0] == (
        "teacher call at 10.0.0.1:50051 failed (ConnectionError: refused); attempt 1, retrying in 0.50 s"
    )
    assert first[1].endswith("attempt 21, retrying in 0.50 s (19 more retries since the last report)")
    assert [line for line in lines if "10.0.0.2:50051" in line] == [
        "teacher call at 10.0.0.2:50051 failed (queue full); attempt 1, retrying in 0.05 s"
    ]  # another address is not held back by the first one's lines
    assert retries.stats.counts == {("10.0.0.1:50051", "UNAVAILABLE"): 30, ("10.0.0.2:50051", "RESOURCE_EXHAUSTED"): 1}
    assert retries.stats.total == 31


def test_retry_stats_are_exported_as_one_labelled_counter():
    from prometheus_client import CollectorRegistry

    stats = RetryStats()
    stats.counts[("a:1", "UNAVAILABLE")] += 3
    stats.counts[("b:2", "RESOURCE_EXHAUSTED")] += 1
    registry = CollectorRegistry()
    registry.register(RetryStatsCollector(stats, "opd_test_teacher_retries", "retries of teacher calls"))
    value = registry.get_sample_value
    assert value("opd_test_teacher_retries_total", {"address": "a:1", "reason": "UNAVAILABLE"}) == 3
    assert value("opd_test_teacher_retries_total", {"address": "b:2", "reason": "RESOURCE_EXHAUSTED"}) == 1
