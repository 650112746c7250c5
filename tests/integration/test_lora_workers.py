"""Rollout workers serve a published LoRA adapter on their base (no base reload; the hf worker merges it into
its weights, vLLM serves it as a LoRARequest) and refuse an adapter of another base; what they sample equals a
transformers forward of the base with that adapter merged by peft."""

from __future__ import annotations

import json
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
from tests.fixtures.rollout import LoopThread, rescore, rollout_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
GREEDY = SampleParams(max_tokens=16, top_k=1)  # top-k 1: the argmax every step, whatever the seed
SAMPLED = SampleParams(max_tokens=16, temperature=1.0, seed=5)


def _edited_adapter(adapter: Path, target: Path, edit, rank: int | None = None, drop: str = "") -> Path:
    """A copy of `adapter` with every tensor passed through `edit(key, tensor)` (and its config's rank set; the
    tensors whose key contains `drop`, if set, left out)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, target)
    state = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if not drop or drop not in k}
    save_file({k: edit(k, v).contiguous() for k, v in state.items()}, target / "adapter_model.safetensors")
    if rank is not None:
        config = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
    return target


def _damage_one(key: str, tensor):
    """v2's adapter with one tensor cut short: a file whose other tensors would load (and change the output)."""
    return tensor[:-1] if key.endswith("layers.1.mlp.down_proj.lora_B.weight") else tensor


def greedy_ids(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def peft_merged(base_dir: Path, adapter: Path, target: Path) -> Path:
    """The base with `adapter` merged by peft (merge_and_unload), saved to `target`: the reference forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(target)
    return target


def weights(backend: HFBackend) -> dict:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


async def test_hf_worker_serves_the_adapter_merged_into_its_weights_and_refuses_another_base(
    tiny_model_dir: Path, lora_run, lora_merged_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel

    out, result = lora_run
    adapter = out / "weights" / "v00000002"
    backend = HFBackend.from_config(rollout_config(tiny_model_dir, redis_url, namespace))
    base = weights(backend)
    prompt = backend.tokenizer.encode("What is 12 + 30?")
    base_greedy = (await backend.generate(prompt, GREEDY, "b")).token_ids
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    watcher = PolicyWatcher(redis, keys, backend)

    async def announce(version: int, path: Path, base_id: str = result["base_id"]) -> bool:
        await announce_policy(
            redis, keys, PolicyAnnouncement(version, str(path), version, kind="lora", base_id=base_id)
        )
        return await watcher.check_once()

    assert not await announce(1, adapter, "sha256:" + "0" * 64) and backend.policy_version == 0  # another base's
    assert await announce(2, adapter) and backend.policy_version == 2
    assert not isinstance(backend.model, PeftModel)  # merged into the plain model's weights, no peft wrapper
    greedy = await backend.generate(prompt, GREEDY, "g")
    assert greedy.policy_version == 2 and greedy.token_ids != base_greedy
    assert greedy.token_ids == greedy_ids(lora_merged_dir, prompt, len(greedy.token_ids))
    sampled = await backend.generate(prompt, SAMPLED, "s")
    # The worker's incremental (KV-cached) float32 forward of W0 + s*BA (one fused addmm) against a whole-sequence
    # forward of peft's merge of the same adapter (BA, scaled, then added): float32 roundings of the weights and
    # of the forward, well inside 1e-4 on log-probs of a few nats.
    np.testing.assert_allclose(sampled.logprobs, rescore(lora_merged_dir, prompt, sampled.token_ids), atol=1e-4)
    assert np.abs(sampled.logprobs - rescore(tiny_model_dir, prompt, sampled.token_ids)).max() > 1e-3
    v2_weights = weights(backend)
    # A new version replaces the previous delta, it does not add to it: B = 0 gives back the base weights exactly
    # (W0 + s*0*A is W0 in any rounding); a damaged adapter is refused whole and B = 0 keeps serving.
    zero_b = _edited_adapter(adapter, tmp_path / "v3", lambda k, t: t * 0 if "lora_B" in k else t)
    assert await announce(3, zero_b) and backend.policy_version == 3
    assert not await announce(4, _edited_adapter(adapter, tmp_path / "v4", _damage_one))
    assert backend.policy_version == 3
    for key, value in weights(backend).items():
        torch.testing.assert_close(value, base[key], rtol=0, atol=0, msg=key)
    assert (await backend.generate(prompt, GREEDY, "g3")).token_ids == base_greedy
    # v2's adapter again: bit for bit v2's weights (each version computed from the kept W0, no accumulated error)
    assert await announce(5, shutil.copytree(adapter, tmp_path / "v5")) and backend.policy_version == 5
    for key, value in weights(backend).items():
        torch.testing.assert_close(value, v2_weights[key], rtol=0, atol=0, msg=key)
    # An adapter of another rank merges the same way; one that no longer targets a module gives it W0 back.
    rank2 = _edited_adapter(adapter, tmp_path / "v6", lambda k, t: t[:2] if "lora_A" in k else t[:, :2], rank=2)
    assert await announce(6, rank2) and backend.policy_version == 6
    expected = peft_merged(tiny_model_dir, rank2, tmp_path / "v6-merged")
    sampled6 = await backend.generate(prompt, SAMPLED, "s6")
    np.testing.assert_allclose(sampled6.logprobs, rescore(expected, prompt, sampled6.token_ids), atol=1e-4)
    q_proj = "model.layers.0.self_attn.q_proj"
    fewer = _edited_adapter(adapter, tmp_path / "v7", lambda k, t: t, drop=f"{q_proj}.")
    assert await announce(7, fewer) and backend.policy_version == 7
    now = weights(backend)
    torch.testing.assert_close(now[f"{q_proj}.weight"], base[f"{q_proj}.weight"], rtol=0, atol=0)
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(now[key], v2_weights[key], rtol=0, atol=0)
    await redis.aclose()


async def test_hf_worker_with_hf_lora_peft_serves_the_adapter_through_peft(
    tiny_model_dir: Path, lora_run, lora_merged_dir: Path, tmp_path: Path
) -> None:
    """`engine.hf_lora: peft`: the same policy through peft's wrapper; later versions of the same shape are
    copied into the serving adapter in place, a damaged one is refused whole, another rank replaces it."""
    from peft import PeftModel

    from rollout_workers.engine import BackendError

    out, _ = lora_run
    adapter = out / "weights" / "v00000002"
    config = rollout_config(tiny_model_dir, "redis://127.0.0.1:1/0", "unused", engine={"hf_lora": "peft"})
    backend = HFBackend.from_config(config)
    prompt = backend.tokenizer.encode("What is 12 + 30?")
    base_greedy = (await backend.generate(prompt, GREEDY, "b")).token_ids
    await backend.load_adapter(adapter, 2)
    assert isinstance(backend.model, PeftModel)
    greedy = await backend.generate(prompt, GREEDY, "g")
    assert greedy.token_ids != base_greedy
    assert greedy.token_ids == greedy_ids(lora_merged_dir, prompt, len(greedy.token_ids))
    sampled = await backend.generate(prompt, SAMPLED, "s")
    # W x + s B (A x) against the merged W + s BA: float32 roundings, well inside 1e-4 on log-probs of a few nats
    np.testing.assert_allclose(sampled.logprobs, rescore(lora_merged_dir, prompt, sampled.token_ids), atol=1e-4)
    await backend.load_adapter(_edited_adapter(adapter, tmp_path / "v3", lambda k, t: t * 0 if "lora_B" in k else t), 3)
    with pytest.raises(BackendError, match="does not fit"):
        await backend.load_adapter(_edited_adapter(adapter, tmp_path / "v4", _damage_one), 4)
    assert backend.policy_version == 3 and list(backend.model.peft_config) == ["v2"]
    assert (await backend.generate(prompt, GREEDY, "g3")).token_ids == base_greedy
    rank2 = _edited_adapter(adapter, tmp_path / "v6", lambda k, t: t[:2] if "lora_A" in k else t[:, :2], rank=2)
    await backend.load_adapter(rank2, 6)
    assert list(backend.model.peft_config) == ["v6"] and backend.model.peft_config["v6"].to_dict()["r"] == 2


def test_vllm_worker_serves_each_adapter_as_a_lora_request_equal_to_the_merged_model(
    tiny_model_dir: Path, lora_run, lora_merged_dir: Path, tmp_path: Path
) -> None:
    """Its own engine: LoRA must be enabled when the engine starts (`engine.vllm.max_lora_rank`), which the
    session's shared engines are not."""
    from rollout_workers.engine import BackendError
    from rollout_workers.engine_vllm import VLLMBackend

    out, _ = lora_run
    adapter = out / "weights" / "v00000002"
    vllm = {"max_num_seqs": 4, "enforce_eager": True, "max_lora_rank": 8}
    config = rollout_config(
        tiny_model_dir, "redis://127.0.0.1:1/0", "unused", backend="vllm", engine={"dtype": "float32", "vllm": vllm}
    )

    async def start() -> VLLMBackend:
        return VLLMBackend.from_config(config)

    loop = LoopThread()
    backend = loop.run(start(), timeout_s=300)
    try:
        prompt = backend.tokenizer.encode("What is 12 + 30?")
        base_greedy = loop.run(backend.generate(prompt, GREEDY, "b")).token_ids
        loop.run(backend.load_adapter(adapter, 2))
        greedy = loop.run(backend.generate(prompt, GREEDY, "g"))
        assert greedy.policy_version == 2 and greedy.token_ids != base_greedy
        assert greedy.token_ids == greedy_ids(lora_merged_dir, prompt, len(greedy.token_ids))
        sampled = loop.run(backend.generate(prompt, SAMPLED, "s"))
        expected = rescore(lora_merged_dir, prompt, sampled.token_ids)
        np.testing.assert_allclose(sampled.logprobs, expected, atol=1e-4)  # as the full-weight vLLM tests
        for version in (3, 4):  # each version a new LoRARequest; the one before the previous is evicted
            shutil.copytree(adapter, tmp_path / f"v{version}")
            loop.run(backend.load_adapter(tmp_path / f"v{version}", version))
        assert sorted(loop.run(backend.engine.list_loras())) == [3, 4]
        assert loop.run(backend.generate(prompt, GREEDY, "g4")).token_ids == greedy.token_ids
        big = tmp_path / "big"
        shutil.copytree(adapter, big)
        cfg = json.loads((big / "adapter_config.json").read_text())
        (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
        with pytest.raises(BackendError, match="rank 16, but this vLLM engine serves LoRA up to rank 8"):
            loop.run(backend.load_adapter(big, 5))
    finally:
        loop.run(backend.close(), timeout_s=60)
        loop.close()
