"""`opd.processes.stop_processes`: SIGTERM to all, one shared grace, SIGKILL for the rest, each reaped."""

from __future__ import annotations

import signal
import subprocess
import sys

from opd.processes import stop_process, stop_processes

# Prints once its SIGTERM handler is in place, then sleeps; `ignore` makes it outlive SIGTERM.
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


def _child(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_stops_the_willing_and_sigkill_the_rest_each_reaped():
    willing, stubborn = _child("default"), _child("ignore")
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(60)
    assert stop_processes([willing, stubborn, done], grace_s=1.0) == [True, False, True]
    assert willing.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert done.returncode == 0


def test_stop_process_of_an_exited_process_sends_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(60)
    assert stop_process(proc, grace_s=0.0) is True
    assert proc.returncode == 3
