"""Rollout workers on the transformers backend: behaviour log-probs, live reload, the worker end to end,
and two worker processes splitting one prompt set while one of them is killed."""

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

from opd.policy import announce_policy
from opd.prompts import PromptSourceConfig, load_prompts
from opd.streams import PROMPT_GROUP, RedisConfig, StreamKeys, connect, read_dead
from protos.records import PolicyAnnouncement, PromptRecord
from rollout_workers.__main__ import main as rollout_main
from rollout_workers.engine import SampleParams
from rollout_workers.engine_hf import HFBackend
from rollout_workers.worker import run_worker
from tests.fixtures.rollout import read_all_rollouts, rescore, rollout_config, write_jsonl
from tests.fixtures.tiny_models import build_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def new_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-v1"), seed=7)


def _backend(model_dir: Path, redis_url: str = "redis://127.0.0.1:1/0", namespace: str = "x") -> HFBackend:
    return HFBackend.from_config(rollout_config(model_dir, redis_url, namespace))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_behaviour_logprobs_equal_a_rescore(tiny_model_dir: Path, temperature: float) -> None:
    backend = _backend(tiny_model_dir)
    prompt = backend.tokenizer.encode("What is 12 + 30?")
    gen = await backend.generate(prompt, SampleParams(max_tokens=24, temperature=temperature, seed=3), "r")
    assert len(gen.token_ids) == len(gen.logprobs) > 0 and gen.policy_version == 0
    expected = rescore(tiny_model_dir, prompt, gen.token_ids, temperature)
    np.testing.assert_allclose(gen.logprobs, expected, atol=1e-4)
    again = await backend.generate(prompt, SampleParams(max_tokens=24, temperature=temperature, seed=3), "r2")
    assert again.token_ids == gen.token_ids  # seeded sampling is reproducible


async def test_reload_switches_to_the_new_weights_and_version(
    tiny_model_dir: Path, new_weights_dir: Path, redis_url: str, namespace: str
) -> None:
    from rollout_workers.reload import PolicyWatcher

    backend = _backend(tiny_model_dir)
    prompt = backend.tokenizer.encode("hello there")
    params = SampleParams(max_tokens=16, seed=5)
    before = await backend.generate(prompt, params, "a")
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    watcher = PolicyWatcher(redis, keys, backend)
    assert not await watcher.check_once()  # nothing announced yet
    await announce_policy(redis, keys, PolicyAnnouncement(1, "/does/not/exist"))
    assert not await watcher.check_once() and backend.policy_version == 0  # bad uri: old weights stay
    await announce_policy(redis, keys, PolicyAnnouncement(2, f"file://{new_weights_dir}", step=10))
    assert await watcher.check_once() and backend.policy_version == 2
    after = await backend.generate(prompt, params, "b")
    assert after.policy_version == 2 and after.token_ids != before.token_ids
    np.testing.assert_allclose(after.logprobs, rescore(new_weights_dir, prompt, after.token_ids), atol=1e-4)
    await redis.aclose()


async def test_worker_end_to_end_with_reward_and_policy_tag(
    tiny_model_dir: Path, new_weights_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    rows[0]["teacher"] = "math"  # the prompt's domain travels onto its rollouts (several teachers)
    records = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), PromptSourceConfig(n_samples=2))
    records.append(PromptRecord("too-long", prompt_ids=np.arange(300, dtype=np.int32) % 300))
    config = rollout_config(tiny_model_dir, redis_url, namespace, reward={"function": "math"}, sampling={"seed": 11})
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await announce_policy(redis, keys, PolicyAnnouncement(4, str(new_weights_dir)))  # before the worker starts
    worker = await asyncio.wait_for(run_worker(config, feed=records), 60)
    rollouts = await read_all_rollouts(redis_url, namespace)
    assert worker.groups_done == 3 and len(rollouts) == 6
    assert Counter(r.prompt_id for r in rollouts) == {"q0": 2, "q1": 2, "q2": 2}
    for r in rollouts:
        assert r.policy_version == 4 and r.reward in (0.0, 1.0) and r.group_size == 2
        assert r.rollout_id == f"{r.group_id}/{r.meta['sample_index']}" and r.meta["backend"] == "hf"
        assert r.teacher == ("math" if r.prompt_id == "q0" else None)
        assert len(r.response_ids) == len(r.behaviour_logprobs) == r.num_generated_tokens > 0
        np.testing.assert_allclose(
            r.behaviour_logprobs, rescore(new_weights_dir, r.prompt_ids.tolist(), r.response_ids.tolist()), atol=1e-4
        )
    dead = await read_dead(redis, keys)
    assert len(dead) == 1 and b"max_model_len" in dead[0]["reason"]
    text = worker.metrics.registry.get_sample_value
    assert text("opd_rollout_rollouts_total", {"split": "train"}) == 6
    assert text("opd_rollout_dead_lettered_records_total") == 1
    assert text("opd_rollout_policy_version") == 4
    await redis.aclose()


def test_cli_reports_bad_inputs_before_starting_an_engine(tmp_path: Path, capsys) -> None:
    assert rollout_main(["--model", str(tmp_path), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert rollout_main(["--model", str(tmp_path), "--reward-function", "nope"]) == 2
    assert "module:function" in capsys.readouterr().err
    assert rollout_main(["--model", str(tmp_path), "--backend", "hf", "--redis-url", "http://x"]) == 2
    assert "rediss://" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rollout_workers", *args]


async def _holder_of_pending(redis, keys: StreamKeys) -> dict[str, int]:
    summary = await redis.xpending(keys.prompts, PROMPT_GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}


@pytest.mark.slow
async def test_two_worker_processes_split_prompts_and_redo_a_killed_workers_prompt(
    tiny_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    rows = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(6)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    common = [
        "--model",
        str(tiny_model_dir),
        "--backend",
        "hf",
        "--redis-url",
        redis_url,
        "--redis-namespace",
        namespace,
        "--ops-port",
        "0",
        "--sampling-max-tokens",
        "8",
        "--engine-max-model-len",
        "128",
        "--queue-block-ms",
        "200",
        "--queue-claim-idle-s",
        "1.5",
        "--queue-max-inflight-prompts",
        "1",
        "--reward-function",
        "tests.fixtures.rollout:hanging_reward",
        "--reward-timeout-s",
        "300",
        "--log-level",
        "WARNING",
    ]
    assert (
        subprocess.run(
            _cli(*common, "--prompts", str(prompts), "--feed-only", "--dataset-n-samples", "2"), timeout=60
        ).returncode
        == 0
    )
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    doomed = subprocess.Popen(_cli(*common, "--worker-id", "A"), env={**env, "OPD_TEST_HANG": "1"})
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    deadline = time.monotonic() + 60
    while (await _holder_of_pending(redis, keys)).get("A-0", 0) == 0:  # A took a prompt and hangs in it
        assert time.monotonic() < deadline, "worker A never took a prompt"
        await asyncio.sleep(0.05)
    survivor = subprocess.Popen(_cli(*common, "--worker-id", "B", "--exit-when-drained"), env=env)
    while (await redis.xlen(keys.rollouts)) < 4:  # B has finished two groups meanwhile
        assert time.monotonic() < deadline + 60, "worker B produced nothing"
        await asyncio.sleep(0.05)
    held = await redis.xpending_range(keys.prompts, PROMPT_GROUP, "-", "+", 10, consumername="A-0")
    os.kill(doomed.pid, signal.SIGKILL)  # mid-group: its prompt is pending, never acked
    doomed.wait()
    assert await asyncio.to_thread(survivor.wait, 90) == 0
    rollouts = await read_all_rollouts(redis_url, namespace)
    assert Counter(r.prompt_id for r in rollouts) == {f"q{i}": 2 for i in range(6)}  # none lost, none twice
    assert len({r.rollout_id for r in rollouts}) == 12
    assert len(held) == 1
    redone = [r for r in rollouts if r.group_id.endswith(f"@{held[0]['message_id'].decode()}")]
    assert len(redone) == 2 and {r.meta["worker"] for r in redone} == {"B-0"}  # A's prompt, finished by B
    assert (await redis.xpending(keys.prompts, PROMPT_GROUP))["pending"] == 0
    await redis.aclose()


def test_ray_flag_without_address_means_a_local_ray() -> None:
    from rollout_workers.__main__ import normalize_argv

    assert normalize_argv(["--ray"]) == ["--ray", "local"]
    assert normalize_argv(["--ray", "--workers", "2"]) == ["--ray", "local", "--workers", "2"]
    assert normalize_argv(["--ray", "ray://head:10001"]) == ["--ray", "ray://head:10001"]


@pytest.mark.slow
def test_local_fleet_of_two_processes_drains_a_prompt_file(
    tiny_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(8)])
    args = [
        "--model",
        str(tiny_model_dir),
        "--backend",
        "hf",
        "--workers",
        "2",
        "--prompts",
        str(prompts),
        "--dataset-n-samples",
        "2",
        "--exit-when-drained",
        "--redis-url",
        redis_url,
        "--redis-namespace",
        namespace,
        "--ops-port",
        "0",
        "--sampling-max-tokens",
        "8",
        "--engine-max-model-len",
        "128",
        "--queue-block-ms",
        "200",
        "--queue-max-inflight-prompts",
        "1",
        "--reward-function",
        "tests.fixtures.rollout:slow_reward",
        "--worker-id",
        "fleet",
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    assert subprocess.run(_cli(*args), env=env, timeout=120).returncode == 0
    rollouts = asyncio.run(read_all_rollouts(redis_url, namespace))
    assert Counter(r.prompt_id for r in rollouts) == {f"q{i}": 2 for i in range(8)}
    assert {r.meta["worker"] for r in rollouts} == {"fleet-0", "fleet-1"}  # both processes took prompts
