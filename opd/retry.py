"""Capped exponential backoff with jitter, and the one retry helper every remote call uses.

Retry policy is a small object passed in (redis-py style). Only idempotent
operations may be retried; the caller says which exceptions are retryable.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
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

    def delays(self) -> Iterator[float]:
        attempt = 1
        while True:
            yield self.delay_s(attempt)
            attempt += 1


async def retry_async(
    op: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    backoff: Backoff = Backoff(),
    max_attempts: int | None = 5,
    deadline_s: float | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run `op` until it succeeds, a non-retryable error is raised, attempts or the deadline run out.

    `deadline_s` is an absolute `time.monotonic()` value; the last error is re-raised on give-up.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except BaseException as exc:  # noqa: BLE001 - filtered by `retryable`
            if not retryable(exc) or (max_attempts is not None and attempt >= max_attempts):
                raise
            delay = backoff.delay_s(attempt)
            if deadline_s is not None and time.monotonic() + delay >= deadline_s:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await asyncio.sleep(delay)
