"""Child processes and local ports: the small helpers the demo, the benchmarks, the rollout fleet and the tests
share. `stop_processes` is the one SIGTERM -> grace -> SIGKILL teardown; nothing else hand-rolls it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable

# One thread per child process: several processes share the cores, and more threads than cores made every step many
# times slower under load (threads spinning on each other's cores). The demo's and the benchmarks' children run so.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(
    proc: subprocess.Popen, grace_s: float = 30.0, *, group: bool = False, kill_wait_s: float = 10.0
) -> bool:
    """SIGTERM (the process group when `group`), wait up to `grace_s`, then SIGKILL; `stop_processes` of one."""
    return stop_processes([proc], grace_s, group=group, kill_wait_s=kill_wait_s)[0]


def stop_processes(
    procs: Iterable[subprocess.Popen], grace_s: float = 30.0, *, group: bool = False, kill_wait_s: float = 10.0
) -> list[bool]:
    """SIGTERM every process still running (its process group when `group`), give them `grace_s` together,
    then SIGKILL those left and reap each within `kill_wait_s` (`subprocess.TimeoutExpired` past that).

    Returns, per process in order, whether it ended without SIGKILL (True for one that had already exited).
    """
    procs = list(procs)
    running = [i for i, proc in enumerate(procs) if proc.poll() is None]
    for i in running:
        _send(procs[i], signal.SIGTERM, group)
    deadline = time.monotonic() + grace_s
    killed = []
    for i in running:
        try:
            procs[i].wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _send(procs[i], signal.SIGKILL, group)
            killed.append(i)
    for i in killed:
        procs[i].wait(kill_wait_s)
    return [i not in killed for i in range(len(procs))]


def _send(proc: subprocess.Popen, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited (and, as a group, its children too) meanwhile
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
