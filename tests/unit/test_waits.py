"""The trainer's waits: they log what they wait for at a bounded rate, and a stop request ends the ones it may."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import pytest

from student_trainer.waits import StopRequested, StopSignal, Waiter

pytestmark = pytest.mark.timeout(30)


def test_a_wait_logs_at_most_once_per_interval_and_ends_on_a_stop_request(caplog) -> None:
    stop = StopSignal()
    waiter = Waiter(stop, log_every_s=0.05, poll_s=0.01)
    never: Future = Future()
    timer = threading.Timer(0.4, stop.request)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="student_trainer.waits"), pytest.raises(StopRequested):
        waiter.result(never, lambda: "rollouts (0 of 4 groups in)")
    lines = [r for r in caplog.records if "waiting for rollouts (0 of 4 groups in)" in r.getMessage()]
    assert len(lines) >= 2
    assert all(b.created - a.created >= 0.05 for a, b in zip(lines, lines[1:], strict=False))
    assert never.cancelled()  # the work waited for is cancelled, not left running


def test_a_wait_that_must_not_be_interrupted_goes_on_after_a_stop_request() -> None:
    stop = StopSignal()
    stop.request()
    waiter = Waiter(stop, log_every_s=10, poll_s=0.01)
    later: Future = Future()
    threading.Timer(0.2, lambda: later.set_result("acked")).start()
    assert waiter.result(later, "Redis to acknowledge", interruptible=False) == "acked"
    done: Future = Future()
    done.set_result(1)
    assert waiter.result(done, "anything") == 1  # a finished wait returns even after a stop request


def test_a_failed_wait_raises_what_failed() -> None:
    waiter = Waiter(StopSignal(), log_every_s=10, poll_s=0.01)
    failed: Future = Future()
    failed.set_exception(TimeoutError("teacher deadline"))
    with pytest.raises(TimeoutError, match="teacher deadline"):
        waiter.result(failed, "teacher scores")
