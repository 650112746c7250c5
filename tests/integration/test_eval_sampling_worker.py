"""A worker samples a prompt that carries its own settings (an eval round's) with them.

The behaviour log-probs of the eval prompt's rollouts equal a rescore at the record's temperature 0.6 (the
worker's own is 1.0), so the engine really sampled at 0.6; the record reports the setting. Tolerance: the same
float32 model on the same CPU, 1e-4 as the other rescore tests of the transformers backend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from protos.records import PromptRecord
from rollout_workers.worker import run_worker
from tests.fixtures.rollout import read_all_rollouts, rescore, rollout_config

pytestmark = pytest.mark.timeout(180)


async def test_an_eval_prompts_own_temperature_is_the_one_sampled(
    tiny_model_dir: Path, redis_url: str, namespace: str
) -> None:
    messages = [{"role": "user", "content": "What is 2 + 1?"}]
    records = [
        PromptRecord("ev", group_size=2, split="eval", messages=messages, answer="3", sampling_temperature=0.6),
        PromptRecord("tr", group_size=1, split="train", messages=messages, answer="3"),
    ]
    config = rollout_config(tiny_model_dir, redis_url, namespace, sampling={"seed": 3, "temperature": 1.0})
    await asyncio.wait_for(run_worker(config, feed=records), 60)
    rollouts = await read_all_rollouts(redis_url, namespace)
    by_prompt = {r.prompt_id: r for r in rollouts}
    assert len(rollouts) == 3 and set(by_prompt) == {"ev", "tr"}
    for r in rollouts:
        want = 0.6 if r.prompt_id == "ev" else 1.0
        assert r.sampling_temperature == want and r.meta["temperature"] == want
        expected = rescore(tiny_model_dir, r.prompt_ids.tolist(), r.response_ids.tolist(), want)
        np.testing.assert_allclose(r.behaviour_logprobs, expected, atol=1e-4)
    ev = by_prompt["ev"]
    at_one = rescore(tiny_model_dir, ev.prompt_ids.tolist(), ev.response_ids.tolist(), 1.0)
    assert np.abs(at_one - ev.behaviour_logprobs).max() > 1e-2  # the check can fail: T 1 gives other log-probs
