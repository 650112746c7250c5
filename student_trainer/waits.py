"""Waiting without hanging: every wait of the trainer reports itself, and a stop request ends the ones it may.

Owns `StopSignal` (a stop request: SIGTERM on this rank, or on any rank through a key in the process group's
store, which rank 0's waits check), `Waiter` (waits on a future or on a collective, logging what it waits for
and for how long once every `log_every_s`, and giving up with `StopRequested` on a stop request where that is
safe; `Ticker` does the logging for polling loops) and `agree_stop`, the step-boundary all-reduce after which
every rank knows whether any rank is stopping.

Why a store key as well as the all-reduce: rank 0 may be waiting for rollouts while the other ranks wait for it
in a collective; a SIGTERM to rank 1 must reach rank 0's wait, or nobody gets to the all-reduce. And why every
collective here is started asynchronously and polled: a rank blocked inside a C++ collective does not run its
Python signal handler until the collective returns. Bounds: the teacher client's deadline (`teacher.timeout_s`),
Redis retries (`redis.retry_for_s`), and the process group's timeout for collectives.
Does not install signal handlers (`student_trainer.__main__` does) or decide what a step does after a stop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")
_ATTACHED = 0  # StopSignal.attach_store calls in this process
Describe = str | Callable[[], str]


class StopRequested(Exception):
    """A stop was requested while waiting; nothing after the wait ran."""


class StopSignal:
    """A stop request for this rank and, through the process group's store, for every rank.

    `request()` only sets a flag, so it is safe in a signal handler; `is_set()` (called by the waits, on the main
    thread) publishes a local request to the store once and, at most every `check_every_s`, looks there for
    another rank's request.
    """

    def __init__(self, check_every_s: float = 0.5) -> None:
        self._local = threading.Event()
        self._store: Any = None
        self._key = ""
        self._published = False
        self._check_every_s, self._next_check = check_every_s, 0.0
        self.requested_at: float | None = None  # time.monotonic() of the first request seen by this rank

    def attach_store(self) -> None:
        """Share requests with the other ranks through the default process group's store (if there is one).
        Every rank attaches once per run, so the n-th attach in a process names the same key on every rank
        (and a torchrun restart, or a second run in one process, starts with a fresh key)."""
        global _ATTACHED
        _ATTACHED += 1
        self._key = f"opd/stop/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_ATTACHED}"
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except Exception as exc:  # noqa: BLE001 - no store: requests stay local to this rank
            log.debug("no process group store for stop requests: %s", exc)

    def request(self) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        self._local.set()

    def is_set(self) -> bool:
        if self._local.is_set():
            self._publish()
            return True
        now = time.monotonic()
        if self._store is not None and now >= self._next_check:
            self._next_check = now + self._check_every_s
            try:
                if self._store.check([self._key]):
                    log.warning("another rank asked to stop")
                    self._published = True
                    self.request()
                    return True
            except Exception as exc:  # noqa: BLE001 - the store is gone with the job: stop too
                log.warning("cannot reach the process group store (%s): stopping", exc)
                self.request()
                return True
        return False

    def _publish(self) -> None:
        if self._published or self._store is None:
            return
        self._published = True
        try:
            self._store.set(self._key, "1")
        except Exception as exc:  # noqa: BLE001 - the other ranks still learn it at the step boundary
            log.warning("cannot tell the other ranks about the stop through the store: %s", exc)


class Waiter:
    """Waits on futures and collectives, logging every `log_every_s` what for and how long."""

    def __init__(self, stop: StopSignal, log_every_s: float = 10.0, poll_s: float = 0.1) -> None:
        self.stop, self.log_every_s, self.poll_s = stop, log_every_s, poll_s

    def result(self, future: Future[T], what: Describe, *, interruptible: bool = True) -> T:
        """`future`'s result. On a stop request (if `interruptible`) the future is cancelled and StopRequested
        raised; otherwise the stop is only passed on to the other ranks and the wait goes on."""
        return self._wait(lambda timeout_s: _result_or_none(future, timeout_s), future.cancel, what, interruptible)

    def ticker(self, what: Describe) -> Ticker:
        """For a wait made of many short ones (a polling loop): `tick()` logs once every `log_every_s`."""
        return Ticker(what, self.log_every_s)

    def collective(self, work: dist.Work | None, what: Describe) -> None:
        """Wait for an asynchronous collective (never interruptible: every rank must take part). `work` is what
        torch's `async_op=True` returns: None only on a rank outside the group, never on the default group."""
        assert work is not None, "an async collective on the default group returns its Work"
        self._wait(lambda timeout_s: _work_done(work, timeout_s), lambda: None, what, interruptible=False)
        work.wait()

    def _wait(
        self,
        poll: Callable[[float], tuple[bool, Any]],
        cancel: Callable[[], Any],
        what: Describe,
        interruptible: bool,
    ) -> Any:
        start = time.monotonic()
        next_log = start + self.log_every_s
        while True:
            done, value = poll(self.poll_s)
            if done:
                return value
            if self.stop.is_set() and interruptible:
                cancel()
                raise StopRequested(_text(what))
            now = time.monotonic()
            if now >= next_log:
                log.warning("waiting for %s: %.0f s so far", _text(what), now - start)
                next_log = now + self.log_every_s


class Ticker:
    def __init__(self, what: Describe, log_every_s: float) -> None:
        self.what, self.log_every_s = what, log_every_s
        self.start = time.monotonic()
        self._next = self.start + log_every_s

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            log.warning("waiting for %s: %.0f s so far", _text(self.what), now - self.start)
            self._next = now + self.log_every_s


def _result_or_none(future: Future, timeout_s: float) -> tuple[bool, Any]:
    # not `future.result(timeout_s)`: a TimeoutError it raises could be the work's own (a teacher deadline)
    done, _ = concurrent.futures.wait([future], timeout_s)
    return (True, future.result()) if done else (False, None)


def _work_done(work: dist.Work, timeout_s: float) -> tuple[bool, None]:
    """Poll a collective for up to `timeout_s`, first often (most finish in microseconds), then every 10 ms."""
    deadline, delay = time.monotonic() + timeout_s, 1e-5
    while not work.is_completed():
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True, None


def _text(what: Describe) -> str:
    return what() if callable(what) else what


def broadcast_flag(flag: bool, waiter: Waiter, what: Describe, device: torch.device) -> bool:
    """Collective: rank 0's `flag`, on every rank (the others wait for rank 0 without blocking their signals)."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    waiter.collective(dist.broadcast(tensor, src=0, async_op=True), what)
    return bool(tensor.item())


def agree_stop(local: bool, waiter: Waiter, device: torch.device) -> bool:
    """Collective, at the step boundary: True on every rank when any rank is stopping."""
    tensor = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    waiter.collective(dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True), "the other ranks (step boundary)")
    return bool(tensor.item())


def barrier(waiter: Waiter, what: Describe) -> None:
    """Collective barrier that logs while it waits (e.g. for rank 0 writing a checkpoint)."""
    waiter.collective(dist.barrier(async_op=True), what)
