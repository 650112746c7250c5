"""retry_async, the one retry loop: a server's delay hint is a floor on the backoff, a hint past the deadline gives
up at once, an expected first failure is resent at once without a report, and non-retryable errors pass through."""

from __future__ import annotations

import time

import pytest

from opd.retry import Backoff, retry_async

pytestmark = pytest.mark.timeout(30)

_FLAT = Backoff(initial_s=0.01, max_s=0.01, jitter=0.0)  # every backoff delay is exactly 0.01 s


class _Busy(Exception):
    def __init__(self, hint_s: float = 0.0) -> None:
        super().__init__("busy")
        self.hint_s = hint_s


class _Aged(Exception):
    """Stands for a stream the server closed at its maximum age."""


class _Failing:
    """An op that raises `errors` in turn, then returns the number of calls; `calls` counts them."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = errors, 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= len(self.errors):
            raise self.errors[self.calls - 1]
        return self.calls


async def test_the_servers_hint_is_a_floor_on_the_delay():
    reports: list[tuple[int, float]] = []
    result = await retry_async(
        _Failing(_Busy(hint_s=0.2), _Busy(hint_s=0.0)),
        retryable=lambda e: isinstance(e, _Busy),
        backoff=_FLAT,
        max_attempts=None,
        on_retry=lambda attempt, _e, delay: reports.append((attempt, delay)),
        min_delay_s=lambda e: getattr(e, "hint_s", 0.0),
    )
    assert result == 3
    assert reports == [(1, 0.2), (2, 0.01)]  # the hint where it is longer, the backoff otherwise


async def test_a_hint_past_the_deadline_gives_up_at_once_with_the_error():
    op = _Failing(*[_Busy(hint_s=5.0)] * 3)
    with pytest.raises(_Busy):
        await retry_async(
            op,
            retryable=lambda e: isinstance(e, _Busy),
            backoff=_FLAT,
            max_attempts=None,
            deadline_s=time.monotonic() + 2.0,
            min_delay_s=lambda e: getattr(e, "hint_s", 0.0),
        )
    assert op.calls == 1  # no second attempt: the hint would end past the deadline


async def test_an_expected_first_failure_is_resent_at_once_without_a_report():
    reports: list[int] = []
    result = await retry_async(
        _Failing(_Aged(), _Aged()),
        retryable=lambda e: isinstance(e, _Aged),
        backoff=_FLAT,
        max_attempts=None,
        on_retry=lambda attempt, _e, _d: reports.append(attempt),
        resend_at_once=lambda e: isinstance(e, _Aged),
    )
    assert result == 3
    assert reports == [2]  # only the second failure is an outage: reported, and waited for


async def test_non_retryable_errors_and_exhausted_attempts_raise_the_error_itself():
    with pytest.raises(ValueError, match="bad input"):
        await retry_async(_Failing(ValueError("bad input")), retryable=lambda e: isinstance(e, _Busy), backoff=_FLAT)
    op = _Failing(*[_Busy()] * 5)
    with pytest.raises(_Busy):
        await retry_async(op, retryable=lambda e: isinstance(e, _Busy), backoff=_FLAT, max_attempts=3)
    assert op.calls == 3
