"""The one retry loop of opd, its backoff policy, and how retries are reported.

Owns `Backoff` (capped exponential delays with jitter, a small frozen object
passed in, redis-py style), `retry_async` (the loop every retried remote call
runs through: the teacher client, the Redis transport's `RedisRetry`, the
rollout workers' policy watcher, the OpenAI-compatible score client) and
`RetryLog`/`RetryStats`: a WARNING naming the address, the attempt and the
next delay, at most once per `interval_s` per address (an outage of many
concurrent calls is a few lines, not thousands), and a count per (address,
reason), which `opd.retry_metrics` exports. Does not decide what may be
retried: only idempotent operations are, and the caller says which errors
are retryable.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n (n >= 1): min(max_s, initial_s * multiplier**(n-1)), full jitter in [1-jitter, 1]."""

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)


async def retry_async(
    op: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    backoff: Backoff = Backoff(),
    max_attempts: int | None = 5,
    deadline_s: float | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    min_delay_s: Callable[[BaseException], float] | None = None,
    resend_at_once: Callable[[BaseException], bool] | None = None,
) -> T:
    """Run `op` until it succeeds, a non-retryable error is raised, attempts or the deadline run out.

    `deadline_s` is an absolute `time.monotonic()` value; the last error is re-raised on give-up (also when
    the next delay would end past the deadline). `on_retry(attempt, error, delay_s)` is called before each
    wait. `min_delay_s(error)` is a floor on the next delay (a server's own hint, such as the teacher's
    `retry-after-s`). A first attempt that fails with an error for which `resend_at_once(error)` holds (an
    expected event, not an outage: a stream the server closed at its maximum age) is retried at once,
    without a delay and without `on_retry`.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except BaseException as exc:  # filtered by `retryable`; everything else is re-raised as it is
            if not retryable(exc) or (max_attempts is not None and attempt >= max_attempts):
                raise
            if attempt == 1 and resend_at_once is not None and resend_at_once(exc):
                continue
            delay = backoff.delay_s(attempt)
            if min_delay_s is not None:
                delay = max(delay, min_delay_s(exc))
            if deadline_s is not None and time.monotonic() + delay >= deadline_s:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await asyncio.sleep(delay)


@dataclass
class RetryStats:
    """Retries counted by (address, reason); plain data, exported by `opd.retry_metrics`."""

    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class RetryLog:
    """Counts every retry and logs it at WARNING, at most once per `interval_s` per address.

    A line names what failed, the address, the error, the attempt and the next delay; lines held back in
    between are counted in the next one ("N more retries since the last report").
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float = 10.0,
        stats: RetryStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.what, self.interval_s, self.clock = logger, what, interval_s, clock
        self.stats = stats if stats is not None else RetryStats()
        self._last_line: dict[str, float] = {}
        self._held_back: collections.Counter[str] = collections.Counter()

    def note(self, address: str, attempt: int, delay_s: float, error: BaseException | str, reason: str = "") -> None:
        """One retry of a call to `address`: `attempt` failed with `error`, the next try is in `delay_s`."""
        reason = reason or (type(error).__name__ if isinstance(error, BaseException) else "error")
        self.stats.counts[(address, reason)] += 1
        now = self.clock()
        last = self._last_line.get(address)
        if last is not None and now - last < self.interval_s:
            self._held_back[address] += 1
            return
        self._last_line[address] = now
        held = self._held_back.pop(address, 0)
        self.logger.warning(
            "%s at %s failed (%s); attempt %d, retrying in %.2f s%s",
            self.what,
            address,
            _describe(error),
            attempt,
            delay_s,
            f" ({held} more retries since the last report)" if held else "",
        )


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
