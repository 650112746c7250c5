"""Cooperative preemption of bulk batches by express batches, for backends that run batches on threads.

Owns one gate shared by the engine's threads. An express batch holds the gate
while it runs (`express()`); a bulk thread calls `checkpoint()` at its
preemption points (the hf backend: before every module of the decoder and
before every lm-head chunk, through forward pre-hooks) and, while any express
batch holds the gate, parks there until none does. A parked thread waits on a
condition variable, so it holds neither the CPU nor Python's GIL: the express
batch runs alone after at most one module of the bulk batch, and the bulk
batch then continues where it stopped, so no bulk work is redone or made
smaller (the flooder's batches stay full).

Why not OS priorities: a bulk thread at nice +19 also loses its core to every
other process on a shared machine (not only to the express thread), and while
descheduled it may hold the GIL the express thread needs. Bulk threads here
run at the normal priority and give way only to express work.

Does not decide what is express (the scheduler does) and does not know torch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class YieldStats:
    """What the bulk threads gave way: times parked at a checkpoint, and seconds spent parked (summed)."""

    yields: int = 0
    seconds: float = 0.0


class ExpressGate:
    """Bulk threads park at checkpoints while express work runs. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._express = 0  # express batches running now
        self._parked = 0  # bulk threads waiting at a checkpoint now
        self._local = threading.local()
        self.stats = YieldStats()  # written under the condition's lock

    def mark_bulk_thread(self) -> None:
        """Make the calling thread a bulk thread (its checkpoints may park); an executor initializer."""
        self._local.bulk = True

    def on_bulk_thread(self) -> bool:
        return getattr(self._local, "bulk", False)

    @contextlib.contextmanager
    def express(self) -> Iterator[None]:
        """Hold the gate while an express batch runs: bulk threads park at their next checkpoint."""
        with self._cond:
            self._express += 1
        try:
            yield
        finally:
            with self._cond:
                self._express -= 1
                if not self._express:
                    self._cond.notify_all()

    def checkpoint(self) -> None:
        """On a bulk thread: return at once when no express batch runs, else park until none does."""
        if not self._express or not getattr(self._local, "bulk", False):  # unlocked read: a late park is harmless
            return
        started = time.monotonic()
        with self._cond:
            self._parked += 1
            released = self._cond.wait_for(lambda: not self._express)
            assert released  # no timeout: wait_for returns only once the predicate holds
            self._parked -= 1
            self.stats.yields += 1
            self.stats.seconds += time.monotonic() - started

    @property
    def parked(self) -> int:
        """Bulk threads waiting at a checkpoint now."""
        with self._cond:
            return self._parked

    def snapshot(self) -> YieldStats:
        with self._cond:
            return YieldStats(self.stats.yields, self.stats.seconds)
