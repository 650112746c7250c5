"""Rollout workers on vLLM's CPU build (one AsyncLLM for the module): behaviour log-probs after temperature,
live weight reload through a policy announcement, and the worker end to end."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from opd.policy import announce_policy
from opd.streams import RedisConfig, StreamKeys, connect
from protos.records import PolicyAnnouncement, PromptRecord
from rollout_workers.engine import SampleParams
from rollout_workers.reload import PolicyWatcher
from rollout_workers.worker import run_worker
from tests.fixtures.rollout import LoopThread, read_all_rollouts, rescore, rollout_config
from tests.fixtures.tiny_models import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[tuple[LoopThread, object]]:
    """One AsyncLLM-backed VLLMBackend for the module, living on a loop in a background thread."""
    from rollout_workers.engine_vllm import VLLMBackend

    config = rollout_config(
        tiny_model_dir,
        "redis://127.0.0.1:1/0",
        "unused",
        backend="vllm",
        engine={"dtype": "float32", "vllm": {"max_num_seqs": 8, "enforce_eager": True}},
    )

    async def start() -> VLLMBackend:
        return VLLMBackend.from_config(config)

    loop = LoopThread()
    backend = loop.run(start(), timeout_s=240)
    yield loop, backend
    loop.run(backend.close(), timeout_s=60)
    loop.close()


def test_group_sampling_logprobs_equal_a_rescore(engine, tiny_model_dir: Path) -> None:
    loop, backend = engine
    prompt = backend.tokenizer.encode("What is 12 + 30?")
    params = SampleParams(max_tokens=20, temperature=0.7)

    async def group():
        return await asyncio.gather(*(backend.generate(prompt, params, f"g{i}") for i in range(4)))

    gens = loop.run(group())
    assert len({tuple(g.token_ids) for g in gens}) > 1  # four independent samples, batched by the engine
    for gen in gens:
        assert len(gen.token_ids) == len(gen.logprobs) > 0 and gen.finish_reason in ("stop", "length")
        np.testing.assert_allclose(gen.logprobs, rescore(tiny_model_dir, prompt, gen.token_ids, 0.7), atol=1e-4)


def test_announced_policy_is_loaded_live(
    engine, tiny_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    loop, backend = engine
    new_dir = build_tiny_model(tmp_path / "v1", seed=7)
    prompt = backend.tokenizer.encode("hello there")
    params = SampleParams(max_tokens=16, temperature=1.0, seed=5)
    start_version = backend.policy_version

    async def reload_and_sample():
        before = await backend.generate(prompt, params, "before")
        redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
        await announce_policy(redis, keys, PolicyAnnouncement(start_version + 1, f"file://{new_dir}", step=5))
        changed = await PolicyWatcher(redis, keys, backend).check_once()
        after = await backend.generate(prompt, params, "after")
        await redis.aclose()
        return before, changed, after

    try:
        before, changed, after = loop.run(reload_and_sample())
        assert changed and after.policy_version == start_version + 1 == backend.policy_version
        assert before.policy_version == start_version and after.token_ids != before.token_ids
        np.testing.assert_allclose(after.logprobs, rescore(new_dir, prompt, after.token_ids), atol=1e-4)
    finally:  # the engine is shared: put the original weights back
        loop.run(backend.load_policy(tiny_model_dir, start_version + 2))


def test_worker_end_to_end_on_vllm(engine, tiny_model_dir: Path, redis_url: str, namespace: str) -> None:
    loop, backend = engine
    config = rollout_config(
        tiny_model_dir,
        redis_url,
        namespace,
        backend="vllm",
        policy_version=0,
        sampling={"temperature": 0.8, "max_tokens": 12},
    )
    records = [
        PromptRecord(f"q{i}", group_size=3, messages=[{"role": "user", "content": f"question {i}"}]) for i in range(3)
    ]
    worker = loop.run(run_worker(config, backend=backend, feed=records), timeout_s=120)
    rollouts = asyncio.run(read_all_rollouts(redis_url, namespace))
    assert worker.groups_done == 3 and Counter(r.prompt_id for r in rollouts) == {"q0": 3, "q1": 3, "q2": 3}
    for r in rollouts:
        assert r.meta["backend"] == "vllm" and r.policy_version == backend.policy_version
        assert r.num_generated_tokens == len(r.response_ids) > 0 and r.reward is None
        np.testing.assert_allclose(
            r.behaviour_logprobs,
            rescore(tiny_model_dir, r.prompt_ids.tolist(), r.response_ids.tolist(), 0.8),
            atol=1e-4,
        )
