"""What the engine delivers (scored tokens per second of busy time) and what each client asks of it.

Owns the estimate and nothing else; the scheduler feeds it (a batch started,
a batch finished with N tokens) and reads it for retry hints and for each
client's share of the teacher in tokens/s. Busy time is the union of the
intervals in which at least one batch was in the engine, so batches that run
concurrently (vLLM, hf on CUDA, an express batch beside a bulk one) are not
counted twice. The estimate is a ratio of sums (tokens / busy seconds) that
decay with time (10 s), so one odd batch moves it little and a changed load
moves it within tens of seconds. `ClientRates`
tracks each client's offered tokens/s, and `fair_level` finds the max-min
fair share of the engine they imply, so the scheduler can tell a client
well within its share from one asking for more.
"""

from __future__ import annotations

import math
import time


class EngineThroughput:
    """Tokens per busy second of the engine. Use on the scheduler's event loop.

    Both sums decay with time (time constant `tau_s`), not per batch: a small express batch that finishes
    while a large bulk batch runs is credited the busy time since the bulk batch started, and the bulk
    batch's tokens come later in one lump, so a per-batch decay would swing the estimate by about the ratio
    of the two (1.8x with 64-request bulk batches and 19 express batches in each); decayed over `tau_s`
    the swing is about one lump over tau_s seconds of throughput (under 20% for lumps of 2.5 s at 10 s).
    """

    def __init__(self, prior_tokens_per_s: float = 10_000.0, tau_s: float = 10.0) -> None:
        self._tau_s = tau_s
        self._tokens, self._busy_s = prior_tokens_per_s * 0.1, 0.1  # a weak prior: 0.1 s at the prior rate
        self._running = 0
        self._mark = 0.0  # start of the busy time not yet attributed to a finished batch
        self._at: float | None = None  # when the sums were last decayed

    def started(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._running == 0:
            self._mark = now
        self._running += 1

    def finished(self, num_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._running -= 1
        busy = max(0.0, now - self._mark)
        self._mark = now
        if self._at is not None:
            keep = math.exp(-max(0.0, now - self._at) / self._tau_s)
            self._tokens, self._busy_s = self._tokens * keep, self._busy_s * keep
        self._at = now
        self._tokens += num_tokens
        self._busy_s += busy

    @property
    def tokens_per_s(self) -> float:
        return self._tokens / max(self._busy_s, 1e-9)

    def seconds_for(self, num_tokens: float) -> float:
        """Engine time `num_tokens` take at the learned rate."""
        return num_tokens / self.tokens_per_s


class ClientRates:
    """Each client's offered load in tokens/s: an exponentially weighted rate with time constant `tau_s`.

    A request of n tokens adds n / tau_s, and the rate decays by exp(-dt / tau_s): for a client sending
    steadily at r tokens/s the estimate settles at r within a few tau_s. Clients not heard from for
    `3 * tau_s` no longer count as active.
    """

    def __init__(self, tau_s: float = 1.0) -> None:
        self._tau_s = tau_s
        self._rate: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def add(self, client: str, num_tokens: int, now: float) -> float:
        """Record a request; the client's rate including it."""
        rate = self.rate(client, now) + num_tokens / self._tau_s
        self._rate[client], self._at[client] = rate, now
        return rate

    def rate(self, client: str, now: float) -> float:
        if client not in self._rate:
            return 0.0
        return self._rate[client] * math.exp(-(now - self._at[client]) / self._tau_s)

    def active(self, now: float) -> dict[str, float]:
        """Rates of the clients heard from within `3 * tau_s`."""
        return {c: self.rate(c, now) for c, at in self._at.items() if now - at < 3 * self._tau_s}


def fair_level(demands: dict[str, float], weights: dict[str, float], capacity: float) -> float:
    """Max-min fair share per unit of weight: the level L with sum_i min(d_i, w_i L) = capacity.

    Clients asking less than w_i L get all they ask; the others get w_i L each. `math.inf` when the
    demands all fit (nobody is held back: no client is over its share).
    """
    if sum(demands.values()) <= capacity:
        return math.inf
    remaining, weight_left = capacity, sum(weights[c] for c in demands)
    for client in sorted(demands, key=lambda c: demands[c] / weights[c]):
        level = remaining / weight_left
        if demands[client] > weights[client] * level:
            return level
        remaining -= demands[client]
        weight_left -= weights[client]
    return math.inf
