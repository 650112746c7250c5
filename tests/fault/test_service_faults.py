"""The services under a training run killed (-9) and started again: the teacher; Redis on its AOF directory, and
Redis with its data lost.

Same tiny pipeline as `test_trainer_faults`. Through a restart the trainer
is not touched and must ride the outage out (the teacher client retries
UNAVAILABLE within its deadline; every Redis call retries a lost
connection); when Redis comes back empty, processes that exit are started
again (the trainer with `--checkpoint-resume`). Each run reaches its last
step with every fed (prompt id, sample index) trained exactly once, recorded
lost, or still in flight.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest

from opd.processes import free_port
from tests.fault.checks import RUN_TIMEOUT_S, finish, wait_step
from tests.fault.conftest import start_teacher, teacher_ready
from tests.fixtures.faults import wait_for
from tests.fixtures.run_audit import audit_lines, first_step_after, last_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_teacher_kill9_and_restart(pipeline):
    pipeline.run.max_steps = 10  # steps left to meet the outage with, whatever step the kill lands after
    teacher = start_teacher(pipeline, free_port())
    pipeline.worker().start()
    trainer = pipeline.trainer(teacher.address).start()
    wait_step(pipeline, trainer, 2, poll_s=0.01)
    # A tiny step takes tens of ms: left running, the trainer could train the rest of the run from rollouts and
    # prefetched scores (depth 1) before the kill lands, and meet no outage (seen in CI). Frozen across the kill,
    # it resumes with a dead teacher and steps that need it.
    trainer.signal(signal.SIGSTOP)
    try:
        at_step = last_step(pipeline.checkpoint_dir)
        fault_at = time.time()
        teacher.kill9()
    finally:
        trainer.signal(signal.SIGCONT)
    assert at_step + 2 < pipeline.run.max_steps, f"the kill landed after step {at_step}: no step is left to need it"
    teacher.start()  # same port, same model
    wait_for(lambda: teacher_ready(teacher.address), 180, "the restarted teacher to serve")
    back_at = time.time()
    assert trainer.alive(), f"the trainer died with the teacher\n{pipeline.tails()}"
    finish(pipeline, trainer, "teacher_kill9", fault_at, back_at, killed_after_step=at_step)
    # the teacher is dead from the kill until `back_at`: the steps past the prefetched one waited for it
    assert first_step_after(pipeline.checkpoint_dir, back_at) is not None, "no step needed the restarted teacher"


# always: what the issue asks of the test; everysec: what deploy/redis/redis.conf ships (compose and Kubernetes)
@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_redis_kill9_and_restart_on_its_aof(pipeline, shared_teacher, appendfsync):
    pipeline.worker().start()
    trainer = pipeline.trainer(shared_teacher.address).start()
    at_step = wait_step(pipeline, trainer, 2)
    fault_at = time.time()
    pipeline.redis.kill9()
    pipeline.redis.start()  # same port, same directory: the AOF replays every acknowledged write
    back_at = time.time()
    client = pipeline.redis.client()
    try:
        groups = {g["name"].decode() for g in client.xinfo_groups(f"{pipeline.namespace}:rollouts")}
    finally:
        client.close()
    assert "trainer" in groups, "the consumer group did not survive the restart: the AOF lost it"
    finish(pipeline, trainer, f"redis_kill9_{appendfsync}", fault_at, back_at, killed_after_step=at_step)


def test_redis_restarted_empty_then_the_run_resumes(pipeline, shared_teacher):
    """What the demo's private Redis (no persistence) or a lost volume does to a run: everything in Redis is gone.
    The trainer's checkpoint lists the prompts it had fed and not trained: started again with
    `--checkpoint-resume`, it feeds those again, and the run ends with each key trained once."""
    worker = pipeline.worker().start()
    trainer = pipeline.trainer(shared_teacher.address, data_group_timeout_s=60).start()
    at_step = wait_step(pipeline, trainer, 2)
    fault_at = time.time()
    pipeline.redis.kill9()
    shutil.rmtree(pipeline.redis.directory)  # the data is lost
    pipeline.redis.directory.mkdir()
    pipeline.redis.start()
    back_at = time.time()
    # A process either rides over the empty Redis or exits (today: NOGROUP on its next read) and is started again.
    exit_codes = {}

    def trainer_exited_or_trained_on() -> bool:
        # two steps: the first may come from batches in memory, and Redis is touched again after each step
        later = [line for line in audit_lines(pipeline.checkpoint_dir) if line["time"] > back_at]
        return not trainer.alive() or len(later) >= 2

    wait_for(trainer_exited_or_trained_on, RUN_TIMEOUT_S, "the trainer to exit or train on")
    if not trainer.alive():
        exit_codes["trainer"] = trainer.wait(0)
        trainer.start(["--checkpoint-resume"])
    client = pipeline.redis.client()
    try:
        rollouts = f"{pipeline.namespace}:rollouts"
        wait_for(
            lambda: not worker.alive() or (client.exists(rollouts) and client.xlen(rollouts)),
            RUN_TIMEOUT_S,
            "the worker to exit or sample again",
        )
    finally:
        client.close()
    if not worker.alive():
        exit_codes["worker"] = worker.wait(0)
        worker.start()
    finish(
        pipeline,
        trainer,
        "redis_restarted_empty",
        fault_at,
        time.time(),  # recovery: to the first step after the processes were started again
        redis_back_s=round(back_at - fault_at, 2),
        killed_after_step=at_step,
        exit_codes=exit_codes,
    )
