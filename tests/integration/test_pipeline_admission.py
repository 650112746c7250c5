"""Admission by version on the tiny pipeline: real Redis, a real teacher server, two rollout worker
processes and `opd train`, each its own process.

Synchronous mode (`batch.max_staleness 0`): every group is sampled at the very version it is trained at, and the
run neither deadlocks (the feeder waits for the workers to load each version, the trainer for the groups) nor
drops anything."""

from __future__ import annotations

import pytest

from tests.fixtures import pipeline
from tests.fixtures.teacher import start_teacher
from tests.fixtures.tiny_models import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("admission-models")
    return {
        "student": build_tiny_model(root / "student", seed=0),
        "teacher": build_tiny_model(root / "teacher", seed=5),
    }


def test_synchronous_mode_trains_every_group_at_the_version_it_was_sampled(models, redis_url, namespace, tmp_path):
    teacher = start_teacher(models["teacher"], "hf")
    workers = [pipeline.start_worker(models["student"], redis_url, namespace) for _ in range(2)]
    steps = 5
    try:
        prompts = pipeline.write_prompts(tmp_path / "p.jsonl", 64, "What is {i} + {i}?")
        args = pipeline.train_args(
            models["student"],
            teacher.address,
            redis_url,
            namespace,
            tmp_path,
            data_prompts=prompts,
            batch_max_staleness=0,
            max_steps=steps,
        )
        out = pipeline.run_train(args, timeout_s=480)  # a deadlock ends as a timeout, not a pass
    finally:
        for worker in workers:
            pipeline.stop(worker)
        teacher.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    lines = pipeline.audit(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    for line in lines:
        # the step that ends with `step` done trains at version step - 1: every group pulled was sampled there
        assert line["policy_versions"] == [line["step"] - 1], line
        assert line["dropped_stale"] == 0 and line["empty_steps"] == 0, line
        assert len(line["rollouts"]) == 4 * 2  # 4 groups x 2 samples, all trained
