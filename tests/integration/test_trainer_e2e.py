"""The trainer end to end on tiny models: real Redis, a real teacher server, a real rollout worker process."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.fixtures import pipeline
from tests.fixtures.teacher import start_teacher
from tests.fixtures.tiny_models import build_tiny_model, build_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-models")
    return {
        "student": build_tiny_model(root / "student", seed=0),
        "teacher": build_tiny_model(root / "teacher", seed=5),
        "other_tokenizer": build_tiny_model(root / "other", seed=5, tokenizer=build_tokenizer(vocab_size=300)),
    }


@pytest.fixture(scope="module")
def teacher(models):
    server = start_teacher(models["teacher"], "hf")
    yield server
    server.stop()


@pytest.fixture
def worker(models, redis_url, namespace):
    proc = pipeline.start_worker(models["student"], redis_url, namespace)
    yield proc
    pipeline.stop(proc)


def test_divergence_is_zero_when_the_teacher_is_the_student(models, redis_url, namespace, worker, tmp_path):
    same = start_teacher(models["student"], "hf")
    try:
        prompts = pipeline.write_prompts(tmp_path / "p.jsonl", 16, "What is {i} + {i}?")
        out = pipeline.run_train(
            pipeline.train_args(
                models["student"],
                same.address,
                redis_url,
                namespace,
                tmp_path,
                data_prompts=prompts,
                max_steps=2,
                optim_lr=1e-12,
            )
        )
    finally:
        same.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    loss, divergence = pipeline.steps(out.stdout)[1]
    assert abs(divergence) < 1e-3, out.stdout  # forward KL of identical models over top-20 + tail


def test_divergence_to_a_different_teacher_falls_on_held_out_prompts(
    models, teacher, redis_url, namespace, worker, tmp_path
):
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 200, "What is {i} + {i}?")
    held_out = pipeline.write_prompts(tmp_path / "eval.jsonl", 8, "Compute {i} * 3.")
    out = pipeline.run_train(
        pipeline.train_args(
            models["student"],
            teacher.address,
            redis_url,
            namespace,
            tmp_path,
            data_prompts=prompts,
            data_eval_prompts=held_out,
            eval_every_steps=10,
            max_steps=20,
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    evals = pipeline.eval_divergences(out.stderr)
    assert 0 in evals and 20 in evals, out.stderr[-3000:]
    assert evals[20] < 0.7 * evals[0], evals  # measured here: ~16 -> ~6 nats per token
    # the workers sampled the published versions: later steps trained on rollouts of newer policies
    versions = [max(s["policy_versions"]) for s in pipeline.audit(tmp_path)]
    assert versions[-1] >= 10 and versions == sorted(versions)


def test_resume_after_a_kill_loses_no_rollout_and_trains_none_twice(
    models, teacher, redis_url, namespace, worker, tmp_path
):
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 200, "What is {i} + {i}?")
    args = pipeline.train_args(
        models["student"],
        teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data_prompts=prompts,
        max_steps=8,
        checkpoint_every_steps=3,
        checkpoint_keep_last=5,
    )
    first = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    for line in first.stdout:
        if line.startswith("step 4/8"):
            first.send_signal(signal.SIGKILL)  # no clean shutdown: step 4 is trained but not committed
            break
    first.wait(60)
    before = pipeline.audit(tmp_path)
    second = pipeline.run_train([*args, "--checkpoint-resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(step 3)" in second.stderr  # resumed from the last committed checkpoint
    after = pipeline.audit(tmp_path)[len(before) :]
    assert [s["step"] for s in after] == [4, 5, 6, 7, 8]
    committed = {r for s in before if s["step"] <= 3 for r in s["rollouts"]}
    uncommitted = {r for s in before if s["step"] == 4 for r in s["rollouts"]}
    retrained = {r for s in after for r in s["rollouts"]}
    assert not committed & retrained  # nothing trained twice
    assert uncommitted <= retrained  # step 4's rollouts were redelivered and trained again, not lost
    assert sum(len(s["rollouts"]) for s in after) == len(retrained)  # and each once


def test_a_teacher_with_another_tokenizer_is_refused(models, redis_url, namespace, tmp_path):
    other = start_teacher(models["other_tokenizer"], "hf")
    try:
        out = pipeline.run_train(
            pipeline.train_args(models["student"], other.address, redis_url, namespace, tmp_path, max_steps=1),
            timeout_s=120,
        )
    finally:
        other.stop()
    assert out.returncode == 2
    assert "tokenizer mismatch" in out.stderr and "Traceback" not in out.stderr
    assert str(models["student"]) in out.stderr and str(models["other_tokenizer"]) in out.stderr
