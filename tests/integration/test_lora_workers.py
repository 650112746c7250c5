"""Issue 26: rollout workers serve a published LoRA adapter on their base (no base reload) and refuse an adapter
of another base; what they sample equals a transformers forward of the base with that adapter merged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from opd.policy import announce_policy
from opd.streams import RedisConfig, StreamKeys, connect
from protos.records import PolicyAnnouncement
from rollout_workers.engine import SampleParams
from rollout_workers.engine_hf import HFBackend
from rollout_workers.reload import PolicyWatcher
from tests.fixtures.rollout import rescore, rollout_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
GREEDY = SampleParams(max_tokens=16, top_k=1)  # top-k 1: the argmax every step, whatever the seed
SAMPLED = SampleParams(max_tokens=16, temperature=1.0, seed=5)


def greedy_ids(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


async def test_hf_worker_serves_the_adapter_as_the_merged_model_and_refuses_another_base(
    tiny_model_dir: Path, lora_run, lora_merged_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    out, result = lora_run
    adapter = out / "weights" / "v00000002"
    backend = HFBackend.from_config(rollout_config(tiny_model_dir, redis_url, namespace))
    prompt = backend.tokenizer.encode("What is 12 + 30?")
    base_greedy = (await backend.generate(prompt, GREEDY, "b")).token_ids
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    watcher = PolicyWatcher(redis, keys, backend)
    other = PolicyAnnouncement(1, str(adapter), kind="lora", base_id="sha256:" + "0" * 64)
    await announce_policy(redis, keys, other)
    assert not await watcher.check_once() and backend.policy_version == 0  # another base's adapter: refused
    await announce_policy(redis, keys, PolicyAnnouncement(2, str(adapter), 2, kind="lora", base_id=result["base_id"]))
    assert await watcher.check_once() and backend.policy_version == 2
    greedy = await backend.generate(prompt, GREEDY, "g")
    assert greedy.policy_version == 2 and greedy.token_ids != base_greedy
    assert greedy.token_ids == greedy_ids(lora_merged_dir, prompt, len(greedy.token_ids))
    sampled = await backend.generate(prompt, SAMPLED, "s")
    # The worker's incremental (KV-cached) float32 forward against a whole-sequence forward of the merged weights
    # (W + BA summed once, vs W x + B (A x)): both float32 roundings, well inside 1e-4 on log-probs of a few nats.
    np.testing.assert_allclose(sampled.logprobs, rescore(lora_merged_dir, prompt, sampled.token_ids), atol=1e-4)
    assert np.abs(sampled.logprobs - rescore(tiny_model_dir, prompt, sampled.token_ids)).max() > 1e-3
    v3 = tmp_path / "v3"
    shutil.copytree(adapter, v3)
    await announce_policy(redis, keys, PolicyAnnouncement(3, str(v3), 3, kind="lora", base_id=result["base_id"]))
    assert await watcher.check_once() and backend.policy_version == 3
    assert list(backend.model.peft_config) == ["v3"]  # the old adapter was evicted
    assert (await backend.generate(prompt, GREEDY, "g3")).token_ids == greedy.token_ids
    await redis.aclose()
