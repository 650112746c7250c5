"""The services under a training run killed (-9) and started again: the teacher, and Redis on its AOF directory.

Same tiny pipeline as `test_trainer_faults`: the trainer is never touched
and must ride the outage out (the teacher client retries UNAVAILABLE within
its deadline; every Redis call retries a lost connection), reach its last
step, and have trained every fed (prompt id, sample index) exactly once.
"""

from __future__ import annotations

import time

import pytest

from opd.processes import free_port
from tests.fault.checks import finish, wait_step
from tests.fault.conftest import start_teacher, teacher_ready
from tests.fixtures.faults import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_teacher_kill9_and_restart(pipeline):
    teacher = start_teacher(pipeline, free_port())
    pipeline.worker().start()
    trainer = pipeline.trainer(teacher.address).start()
    at_step = wait_step(pipeline, trainer, 2)
    fault_at = time.time()
    teacher.kill9()
    teacher.start()  # same port, same model
    wait_for(lambda: teacher_ready(teacher.address), 180, "the restarted teacher to serve")
    back_at = time.time()
    assert trainer.alive(), f"the trainer died with the teacher\n{pipeline.tails()}"
    finish(pipeline, trainer, "teacher_kill9", fault_at, back_at, killed_after_step=at_step)


def test_redis_kill9_and_restart_on_its_aof(pipeline, shared_teacher):
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
    finish(pipeline, trainer, "redis_kill9", fault_at, back_at, killed_after_step=at_step)
