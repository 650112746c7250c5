"""SIGTERM to `opd train` and to one rank of a two-rank torchrun trainer: it stops, checkpoints, and exits.

Real processes on 127.0.0.1: a private Redis, a teacher server, the trainer as `opd train` (one process) or under
torchrun (two gloo ranks). Rollouts for two steps are pushed first; then the trainer is starved (no worker), so
the signal finds it waiting for data (a few seconds after its last step), the wait that used to ignore it. Each
test asserts the process exits (under a deadline: a hang fails the test), with code 0, having committed a final
checkpoint of the steps it trained, on every rank, and acknowledged their rollouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from opd.loop_thread import LoopThread
from tests.fixtures import pipeline
from tests.fixtures.fake_worker import rollout
from tests.fixtures.torchrun import torchrun_argv, torchrun_env
from tests.fixtures.trainer_runtime import jsonl, pending_rollouts, push_rollouts, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def io():
    loop = LoopThread("test-stop-io")
    yield loop
    loop.stop()


def _args(model: Path, teacher: str, redis_url: str, namespace: str, run: Path, groups_per_step: int) -> list[str]:
    return pipeline.train_args(
        model,
        teacher,
        redis_url,
        namespace,
        run,
        batch_groups_per_step=groups_per_step,
        batch_read_block_ms=200,
        batch_prefetch_depth=0,
        checkpoint_every_steps=5,
        max_steps=10,
    )


class _Output:
    """Collects a process's output lines on a thread, so the test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._thread.start()

    def wait_for(self, prefix: str, timeout_s: float) -> None:
        wait_until(lambda: any(line.startswith(prefix) for line in self.lines), timeout_s, repr(prefix))

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


def _starved(proc: subprocess.Popen) -> _Output:
    """Wait until step 2 is done (all the rollouts there are), then a few seconds more: the trainer is then
    waiting for rollouts that will not come, not between two steps."""
    output = _Output(proc)
    output.wait_for("step 2/10", 300)
    time.sleep(3)
    assert proc.poll() is None, output.text()[-3000:]
    return output


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(30)


def _assert_stopped_with_a_checkpoint(run: Path, step: int, ranks: int) -> None:
    committed = run / "checkpoints" / f"step-{step:08d}"
    assert committed.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())
    assert sorted(p.name for p in committed.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(ranks)]
    assert torch.load(committed / "trainer_state.pt", weights_only=False)["step"] == step
    assert [s["step"] for s in jsonl(run / "checkpoints" / "steps.jsonl")] == list(range(1, step + 1))


def test_sigterm_stops_a_starved_trainer_with_a_final_checkpoint(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io
):
    push_rollouts(io, redis_url, namespace, [rollout(f"g{i}", f"{i + 1}-0") for i in range(2)])
    proc = subprocess.Popen(
        _args(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path, groups_per_step=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output = _starved(proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        _kill(proc)
    assert proc.returncode == 0, output.text()[-3000:]
    _assert_stopped_with_a_checkpoint(tmp_path, 2, ranks=1)
    assert pending_rollouts(io, redis_url, namespace) == 0  # the final checkpoint's rollouts were acknowledged


@pytest.mark.parametrize("signalled_rank", [1, 0])
def test_sigterm_to_one_rank_stops_every_rank_with_one_final_checkpoint(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, signalled_rank
):
    push_rollouts(io, redis_url, namespace, [rollout(f"g{i}", f"{i + 1}-0") for i in range(4)])
    args = _args(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path, groups_per_step=2)
    proc = subprocess.Popen(
        torchrun_argv(2, "student_trainer", *args[args.index("train") + 1 :]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=torchrun_env(PYTHONUNBUFFERED="1"),
    )
    try:
        output = _starved(proc)
        ranks = wait_until(
            lambda: (
                (found := {int(c.environ().get("RANK", -1)): c for c in psutil.Process(proc.pid).children()})
                and {0, 1} <= found.keys()
                and found
            ),
            30,
            "both ranks",
        )
        ranks[signalled_rank].send_signal(signal.SIGTERM)  # one rank only, not torchrun
        proc.wait(timeout=180)
    finally:
        _kill(proc)
    assert proc.returncode == 0, output.text()[-4000:]
    _assert_stopped_with_a_checkpoint(tmp_path, 2, ranks=2)
    assert pending_rollouts(io, redis_url, namespace) == 0
