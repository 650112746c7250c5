"""One kind of student for `opd bench publish` (`opd_apps.bench.publish`), in its own process.

Usage: python -m opd_apps.bench.publish_one SPEC_JSON; prints `RESULT {json}`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path


def measure(spec: dict) -> dict:
    import torch

    from student_trainer.config import DistConfig, LoraConfig, OptimConfig
    from student_trainer.loss.config import LossConfig
    from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
    from student_trainer.optim import build_optimizer

    dist_config = DistConfig(backend="gloo", mixed_precision="none")
    info = init_distributed(dist_config)
    torch.manual_seed(0)
    lm = load_student(spec["model"], info.device)
    base_id = ""
    if spec["rank"]:
        from student_trainer import lora

        base_id = lora.base_identity(spec["model"])
        lm = lora.apply_lora(lm, LoraConfig(rank=spec["rank"], alpha=2.0 * spec["rank"]))
    root = shard_student(StudentLoss(lm, LossConfig(divergence="fkl")), dist_config, info.device)
    optimizer, _ = build_optimizer(root, OptimConfig(lr=1e-3), 10)
    step_s = min(_train_step(root, optimizer, spec["tokens"], lm) for _ in range(spec["steps"]))
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"status": "ok", "step_s": step_s, "peak_rss_mib": peak_rss_mib, **_publish_and_serve(spec, root, base_id)}


def _train_step(root, optimizer, tokens: int, lm) -> float:
    from opd_apps.bench.trainer_step import _groups, _teacher
    from student_trainer.batching import build_micro_batch
    from student_trainer.loss.inputs import TeacherTensors
    from student_trainer.loss.planning import count_denominators, step_denominators

    vocab = int(lm.get_output_embeddings().weight.shape[0])
    start = time.perf_counter()
    mb = build_micro_batch(_groups(tokens, 4, vocab), {})
    teacher = _teacher(len(mb.rows_N), vocab, mb.input_ids_1T.device, TeacherTensors)
    denominators = step_denominators(count_denominators(mb.inputs, root.loss_config), root.loss_config)
    loss, _ = root(mb, teacher, 0, denominators)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _publish_and_serve(spec: dict, root, base_id: str) -> dict:
    """Publish a version as the trainer does, then load it into a worker backend (`spec["backend"]`: hf or vllm;
    running, with the version before loaded, as a worker is mid-run) and generate: the turnaround in its three
    parts (publish, the backend's load, the first token) and the worker's tokens/s."""
    return asyncio.run(_serve(spec, root, base_id))


async def _serve(spec: dict, root, base_id: str) -> dict:
    from rollout_workers.engine import SampleParams
    from student_trainer.publish import publish_weights

    start = time.perf_counter()
    backend = await _backend(spec, bool(base_id))
    backend_start_s = time.perf_counter() - start
    prompt = list(range(1, 17))
    one, many = SampleParams(max_tokens=1, top_k=1), SampleParams(max_tokens=spec["gen_tokens"], top_k=1)
    load = backend.load_adapter if base_id else backend.load_policy
    try:
        # Version 1 warms the worker up (an hf LoRA worker keeps a copy of its base's target weights on its first
        # adapter, which it merges into them from then on); then
        # versions 2, 3, ... are timed, the best of `reloads` reported (a version's turnaround is one sample).
        await load(publish_weights(root, spec["model"], spec["out"], 1, 3, True, 0.0, base_id), 1)
        await backend.generate(prompt, one, "warm-up")
        parts = []
        for version in range(2, 2 + spec.get("reloads", 3)):
            t0 = time.perf_counter()  # the end of the step
            target = publish_weights(root, spec["model"], spec["out"], version, 3, True, 0.0, base_id)
            t1 = time.perf_counter()
            await load(target, version)
            t2 = time.perf_counter()
            first = await backend.generate(prompt, one, f"first{version}")
            t3 = time.perf_counter()
            assert first.policy_version == version
            parts.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
        gen_s, tokens = [], 0
        for i in range(3):
            t0 = time.perf_counter()
            tokens = len((await backend.generate(prompt, many, f"gen{i}")).token_ids)
            gen_s.append(time.perf_counter() - t0)
    finally:
        await backend.close()
    turnaround_s, publish_s, load_s, first_token_s = min(parts)
    version_bytes = sum(f.stat().st_size for f in Path(target).iterdir() if f.is_file())
    return {
        "version_bytes": version_bytes,
        "turnaround_s": turnaround_s,
        "publish_s": publish_s,
        "load_s": load_s,
        "first_token_s": first_token_s,
        "gen_tokens_per_s": tokens / min(gen_s),
        "backend_start_s": backend_start_s,
    }


async def _backend(spec: dict, lora: bool):
    """The worker's backend on the student's base, as `opd rollout` builds it (`create_backend`: on the CPU build,
    vLLM's KV cache is `kv_cache_gib`, 1 GiB, not vLLM's default of most of the machine's memory); vLLM eager (no
    compilation: its CPU build compiles for minutes, and turns compilation off with LoRA anyway), LoRA enabled
    only for a LoRA student."""
    from rollout_workers.config import RolloutConfig
    from rollout_workers.engine import create_backend

    engine: dict = {"dtype": "float32", "max_model_len": 512, "device": "cpu"}
    engine["hf_lora"] = spec.get("hf_lora", "merged")
    if spec["backend"] == "vllm":
        engine["vllm"] = {"max_num_seqs": 4, "enforce_eager": True, "kv_cache_gib": 1}
        engine["vllm"]["max_lora_rank"] = spec["rank"] if lora else 0
    data = {"model": spec["model"], "backend": spec["backend"], "engine": engine, "sampling": {"max_tokens": 256}}
    return await create_backend(RolloutConfig.model_validate(data))


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
