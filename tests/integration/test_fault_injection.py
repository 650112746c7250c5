"""Fault injection with real processes: kill -9 a rollout worker mid-run and start a replacement
under another name; kill -9 the teacher mid-stream while several clients score. Both print the recovery
times that RELIABILITY.md records; neither asserts a duration."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from redis.exceptions import ResponseError

from opd.redis_server import free_port
from opd.stream_heartbeat import alive_key
from opd.streams import PROMPT_GROUP, RedisConfig, StreamKeys, connect
from teacher_server.client import TeacherClient
from tests.fixtures import pipeline
from tests.fixtures.teacher import random_sequences, reference_logprobs, start_teacher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _worker(model_dir: Path, redis_url: str, namespace: str, worker_id: str, hang: bool) -> subprocess.Popen:
    """`opd rollout` with the default heartbeat and idle-claim settings: only the heartbeat can reclaim a
    dead worker's prompt within this test (the idle fallback waits claim_idle_s = 300 s)."""
    args = [
        sys.executable, "-m", "opd", "rollout", "--model", str(model_dir), "--backend", "hf",
        "--redis-url", redis_url, "--redis-namespace", namespace, "--worker-id", worker_id, "--ops-port", "0",
        "--sampling-max-tokens", "8", "--engine-max-model-len", "256", "--queue-max-inflight-prompts", "1",
        "--reward-function", "tests.fixtures.rollout:hanging_reward", "--reward-timeout-s", "300",
        "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(args, env={**ENV, "OPD_TEST_HANG": "1" if hang else "0"})


async def _pending_of(redis, keys: StreamKeys, consumer: str) -> list[str]:
    try:
        rows = await redis.xpending_range(keys.prompts, PROMPT_GROUP, "-", "+", 100, consumername=consumer)
    except ResponseError:  # NOGROUP: nobody has fed or read the prompt stream yet
        return []
    return [r["message_id"].decode() for r in rows]


async def _owner(redis, keys: StreamKeys, entry_id: str) -> str | None:
    rows = await redis.xpending_range(keys.prompts, PROMPT_GROUP, entry_id, entry_id, 1)
    return rows[0]["consumer"].decode() if rows else None


def test_a_killed_workers_prompt_is_reclaimed_by_its_replacement_and_trained_once(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    teacher = start_teacher(tiny_model_dir, "hf")
    # 2 steps of 4 groups train 8 prompts; the trainer's prefetch pulls one batch beyond its last step, so
    # 4 more are fed. The killed worker's prompt is the replacement's first group: it lands in step 1.
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 12, "What is {i} + {i}?")
    args = pipeline.train_args(
        tiny_model_dir, teacher.address, redis_url, namespace, tmp_path,
        data_prompts=prompts, max_steps=2, checkpoint_every_steps=1,
    )  # fmt: skip
    trainer = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    doomed = _worker(tiny_model_dir, redis_url, namespace, "A", hang=True)
    replacement = None

    async def kill_and_replace() -> tuple[str, float, float, float]:
        nonlocal replacement
        redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
        deadline = time.monotonic() + 180
        while not (held := await _pending_of(redis, keys, "A-0")):  # A took a prompt and hangs in its reward
            assert time.monotonic() < deadline, "worker A never took a prompt"
            await asyncio.sleep(0.05)
        os.kill(doomed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # The replacement starts once A's heartbeat has expired, so its first read claims A's prompt before any
        # new one: the held group is certain to be among the 8 the trainer's 2 steps take. (Started earlier, it
        # can fill both steps with new prompts before the heartbeat TTL runs out.)
        a_alive = alive_key(keys.prompts, PROMPT_GROUP, "A-0")
        while await redis.exists(a_alive):
            assert time.monotonic() < killed_at + 120, "A's heartbeat never expired"
            await asyncio.sleep(0.05)
        replacement = _worker(tiny_model_dir, redis_url, namespace, "B", hang=False)
        b_alive, up_s = alive_key(keys.prompts, PROMPT_GROUP, "B-0"), None
        while (owner := await _owner(redis, keys, held[0])) == "A-0":
            assert time.monotonic() < killed_at + 240, "A's prompt was never taken over"
            if up_s is None and await redis.exists(b_alive):
                up_s = time.monotonic() - killed_at  # the replacement has loaded its model and beats
            await asyncio.sleep(0.05)
        claimed_s = time.monotonic() - killed_at
        await redis.aclose()
        assert owner in ("B-0", None)  # taken by the replacement (None: already done and acked)
        return held[0], killed_at, claimed_s, up_s if up_s is not None else claimed_s

    try:
        held, killed_at, claimed_s, up_s = asyncio.run(kill_and_replace())
        _, err = trainer.communicate(timeout=400)
        trained_s = time.monotonic() - killed_at
    finally:
        for proc in (trainer, doomed, replacement):
            if proc is not None:
                pipeline.stop(proc)
        teacher.stop()
    assert trainer.returncode == 0, err[-3000:]
    print(
        f"\nworker SIGKILL -> replacement up: {up_s:.1f} s; -> prompt claimed: {claimed_s:.1f} s; "
        f"-> run finished (held group trained): {trained_s:.1f} s"
    )
    steps = pipeline.audit(tmp_path)
    trained = Counter(r for s in steps for r in s["rollouts"])
    assert all(n == 1 for n in trained.values())  # nothing trained twice
    redone = [r for r in trained if r.split("/")[0].endswith(f"@{held}")]
    assert len(redone) == 2  # the killed worker's group, both samples, trained exactly once
    assert len(trained) == 16  # 2 steps x 4 groups x 2 samples, each once


async def test_a_running_worker_claims_a_killed_workers_prompt_at_the_default_heartbeat_bound(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    from tests.fixtures.rollout import read_all_rollouts, write_jsonl

    rows = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(4)]
    feed = [
        sys.executable, "-m", "opd", "rollout", "--model", str(tiny_model_dir), "--redis-url", redis_url,
        "--redis-namespace", namespace, "--prompts", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--feed-only",
        "--dataset-n-samples", "2",
    ]  # fmt: skip
    assert subprocess.run(feed, env=ENV, timeout=120).returncode == 0
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    doomed = _worker(tiny_model_dir, redis_url, namespace, "A", hang=True)
    survivor = None
    try:
        deadline = time.monotonic() + 180
        while not (held := await _pending_of(redis, keys, "A-0")):
            assert time.monotonic() < deadline, "worker A never took a prompt"
            await asyncio.sleep(0.05)
        survivor = _worker(tiny_model_dir, redis_url, namespace, "B", hang=False)
        while not await redis.exists(alive_key(keys.prompts, PROMPT_GROUP, "B-0")):  # B is up and beating
            assert time.monotonic() < deadline, "worker B never started"
            await asyncio.sleep(0.05)
        os.kill(doomed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while await _owner(redis, keys, held[0]) == "A-0":  # default TTL 15 s; the idle fallback is 300 s
            assert time.monotonic() < killed_at + 240, "A's prompt was never taken over"
            await asyncio.sleep(0.05)
        claimed_s = time.monotonic() - killed_at
        while await redis.xlen(keys.rollouts) < 8:  # every group done: 4 prompts x 2 samples
            assert time.monotonic() < killed_at + 240, "worker B did not finish the prompts"
            await asyncio.sleep(0.1)
    finally:
        for proc in (doomed, survivor):
            if proc is not None:
                pipeline.stop(proc)
    print(f"\nworker SIGKILL -> its prompt claimed by a running worker: {claimed_s:.1f} s (heartbeat TTL 15 s)")
    rollouts = await read_all_rollouts(redis_url, namespace)
    assert Counter(r.prompt_id for r in rollouts) == {f"q{i}": 2 for i in range(4)}  # none lost, none twice
    redone = [r for r in rollouts if r.group_id.endswith(f"@{held[0]}")]
    assert len(redone) == 2 and {r.meta["worker"] for r in redone} == {"B-0"}
    await redis.aclose()


async def _wait_ready(target: str, timeout_s: float) -> None:
    async with TeacherClient(target, timeout_s=timeout_s) as client:
        await client.info()


def _teacher_process(model_dir: Path, port: int) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "opd", "teacher", "--model", str(model_dir), "--backend", "hf",
        "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--ops-host", "127.0.0.1", "--ops-port", "0",
        "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(args, env=ENV)


def test_a_killed_teacher_loses_no_in_flight_request_of_several_clients(tiny_model_dir):
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = _teacher_process(tiny_model_dir, port)
    second = None
    per_client = [random_sequences(24, 384, min_len=96, max_len=192, seed=s) for s in range(3)]

    async def main():
        nonlocal second
        await _wait_ready(target, 120)
        clients = [TeacherClient(target, client_name=f"student-{i}", timeout_s=240) for i in range(3)]
        tasks = [
            [asyncio.create_task(c.score(ids, 1, top_k=4)) for ids in seqs]
            for c, seqs in zip(clients, per_client, strict=True)
        ]
        flat = [t for ts in tasks for t in ts]
        while sum(t.done() for t in flat) < 6:  # the stream is busy: some answered, most in flight
            await asyncio.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = sum(not t.done() for t in flat)
        second = await asyncio.to_thread(_teacher_process, tiny_model_dir, port)
        await _wait_ready(target, 120)
        back_at = time.monotonic()
        results = [await asyncio.gather(*ts) for ts in tasks]
        done_at = time.monotonic()
        retries = [c.retry_stats.counts[(target, "UNAVAILABLE")] for c in clients]
        for c in clients:
            await c.close()
        return results, in_flight, killed_at, back_at, done_at, retries

    try:
        results, in_flight, killed_at, back_at, done_at, retries = asyncio.run(main())
    finally:
        for proc in (first, second):
            if proc is not None:
                pipeline.stop(proc)
    print(
        f"\nteacher SIGKILL with {in_flight} of {sum(map(len, per_client))} requests in flight (3 clients): "
        f"restarted and ready after {back_at - killed_at:.1f} s; every request answered "
        f"{done_at - back_at:.1f} s after that; retries per client {retries}"
    )
    assert in_flight > 0 and all(r > 0 for r in retries)  # the kill did cut requests, and they were retried
    for seqs, scores in zip(per_client, results, strict=True):  # none lost, each the right answer
        assert len(scores) == len(seqs)
        for ids, s in zip(seqs, scores, strict=True):
            ref = reference_logprobs(tiny_model_dir, ids)
            # the same float32 weights in two processes: summation-order differences only (~1e-6 nats)
            np.testing.assert_allclose(s.token_logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
