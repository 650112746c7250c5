"""`opd bench trainer --micro-batch-tokens 2048,8192,32768,100000`: one training step per micro-batch size.

Owns the micro-batch step benchmark: for each micro-batch size T (a
packed row of `--sequences-per-micro-batch` sequences of T / S tokens each)
and each attention path, one training step of the student on a small random
model (packing the micro-batch, forward to the chunked loss against a
synthetic top-20 teacher, backward, AdamW; float32 on CPU, bf16 parameters on
CUDA as FSDP's mixed precision computes), each in its own subprocess:

  mask:   the reference path, a dense block-diagonal causal `[T, T]` mask;
  sdpa:   the packed path, causal SDPA per sequence (flash kernels on CUDA);
  flex:   compiled flex_attention with a document mask (CUDA only; not by default).

Measured: peak extra memory of the step (growth of peak RSS on CPU,
`torch.cuda.max_memory_allocated` on CUDA; the micro-batch, its mask,
activations, gradients) and trained tokens/s (response tokens / step time:
wall time on CPU, median CUDA-event time on CUDA after a full-size warm-up).
The mask path is skipped above `--mask-cap-gib`, with the estimated size of
its mask tensors printed instead. Needs torch, transformers, pydantic,
msgpack and this repository only (no Redis, gRPC or HTTP packages).
"""

from __future__ import annotations

import argparse
import json
import sys

from opd_apps.bench.common import run_isolated

PROMPT_TOKENS = 16
TOP_K = 20
# Small random Qwen2-style students: (hidden, layers, heads, kv heads, intermediate, vocab).
MODELS = {
    "quick": (64, 1, 1, 1, 128, 1024),
    "cpu": (128, 2, 2, 1, 256, 8192),
    "cuda": (1024, 8, 16, 4, 2816, 32768),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("micro-batch step benchmark (runs instead of the prefetch benchmark)")
    g.add_argument("--micro-batch-tokens", help="comma-separated micro-batch sizes T, e.g. 2048,8192,32768,100000")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs (default cpu)")
    g.add_argument("--sequences-per-micro-batch", type=int, default=4, help="sequences packed into each T")
    g.add_argument(
        "--paths", default="mask,sdpa", help="attention paths, comma-separated: mask, sdpa, flex (CUDA only)"
    )
    g.add_argument(
        "--mask-cap-gib",
        type=float,
        default=None,
        help="skip the mask path when its [T, T] tensors would exceed this (default 16 on CUDA, 2 on CPU)",
    )
    g.add_argument("--repeats", type=int, default=None, help="timed steps per cell (default 1 on CPU, 3 on CUDA)")
    g.add_argument("--step-timeout-s", type=float, default=3600.0, help="wall-clock limit per cell")


def run(args: argparse.Namespace) -> int:
    sizes = [int(t) for t in str(args.micro_batch_tokens).split(",") if t.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in ("mask", "sdpa", "flex")] + [t for t in sizes if t < 2 * PROMPT_TOKENS]
    if bad or args.sequences_per_micro_batch < 1:
        raise SystemExit(f"opd bench trainer: bad --paths or --micro-batch-tokens ({bad}); see --help")
    model = "quick" if args.quick else args.device
    cap_gib = args.mask_cap_gib if args.mask_cap_gib is not None else (16.0 if args.device == "cuda" else 2.0)
    repeats = args.repeats or (3 if args.device == "cuda" else 1)
    hidden, layers, heads, kv, inter, vocab = MODELS[model]
    print(
        f"# opd bench trainer: one training step per micro-batch; device={args.device}; model {model}: hidden "
        f"{hidden}, {layers} layers, {heads} heads ({kv} KV), vocab {vocab}; {args.sequences_per_micro_batch} "
        f"sequences per micro-batch ({PROMPT_TOKENS} prompt tokens each), fkl over a top-{TOP_K} teacher; "
        f"{repeats} timed step(s) per cell, each cell in its own process"
    )
    print("| micro-batch tokens | path | peak extra MiB | step s | trained tokens/s | memory vs mask | tok/s vs mask |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in sizes:
        results = {}
        for path in paths:
            spec = {
                "tokens": tokens,
                "path": path,
                "device": args.device,
                "model": model,
                "sequences": args.sequences_per_micro_batch,
                "repeats": repeats,
            }
            mask_gib = _mask_bytes(tokens) / 2**30
            if path == "mask" and mask_gib > cap_gib:
                results[path] = {"status": f"skipped: its [T, T] mask tensors need ~{mask_gib:.1f} GiB (> cap)"}
            else:
                results[path] = _run_isolated(spec, args.step_timeout_s)
            print(_row(tokens, path, results[path], results.get("mask")), flush=True)
    device = results and next((r.get("device") for r in results.values() if r.get("device")), None)
    if device:
        print(f"\ndevice: {device}")
    return 0


def _mask_bytes(tokens: int) -> int:
    """The reference path's [T, T] tensors: the bool mask, plus the float copy SDPA makes of it (4 B/entry)."""
    return tokens * tokens * (1 + 4)


def _row(tokens: int, path: str, res: dict, mask: dict | None) -> str:
    if res["status"] != "ok":
        return f"| {tokens} | {path} | {res['status']} | - | - | - | - |"
    ratios = ["-", "-"]
    if mask and mask.get("status") == "ok" and path != "mask":
        ratios = [
            f"{mask['peak_extra_mib'] / max(res['peak_extra_mib'], 1e-9):.1f}x less",
            f"{res['tokens_per_s'] / mask['tokens_per_s']:.2f}x",
        ]
    return (
        f"| {tokens} | {path} | {res['peak_extra_mib']:.0f} | {res['time_s']:.3f} | {res['tokens_per_s']:.0f} "
        f"| {' | '.join(ratios)} |"
    )


def _run_isolated(spec: dict, timeout_s: float) -> dict:
    return run_isolated(["opd_apps.bench.trainer_step", json.dumps(spec)], timeout_s)


# ----------------------------------------------------------------------------- worker (one cell)


def _worker(spec: dict) -> dict:
    import statistics

    import torch

    from opd_apps.bench.losses import _MemoryProbe, _Timer

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    step = _make_step(spec, device)
    if device.type == "cuda":
        step(spec["tokens"])  # warm-up at full size: kernels, optimizer state, compiled code
        torch.cuda.synchronize()
    else:
        step(min(spec["tokens"], 256))  # thread pools, optimizer state
    peaks, times = [], []
    for _ in range(spec["repeats"]):
        probe = _MemoryProbe(device, 1e6)
        try:
            with probe:
                timer = _Timer(device)
                trained = step(spec["tokens"])
                times.append(timer.elapsed_s())
        except (MemoryError, torch.OutOfMemoryError):
            return {"status": "out of memory"}
        peaks.append(probe.peak_extra_bytes)
    time_s = statistics.median(times) if device.type == "cuda" else min(times)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {
        "status": "ok",
        "peak_extra_mib": max(peaks) / 2**20,
        "time_s": time_s,
        "tokens_per_s": trained / time_s,
        "device": f"{name}, torch {torch.__version__}",
    }


def _make_step(spec: dict, device):
    """A closure: one training step on a fresh micro-batch of `tokens` tokens; returns the trained tokens."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from student_trainer import attention
    from student_trainer.batching import build_micro_batch
    from student_trainer.loss.config import LossConfig
    from student_trainer.loss.inputs import TeacherTensors
    from student_trainer.loss.planning import count_denominators, step_denominators
    from student_trainer.model import StudentLoss

    hidden, layers, heads, kv, inter, vocab = MODELS[spec["model"]]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max(spec["tokens"], 256),
        tie_word_embeddings=False,
    )
    # bf16 parameters on CUDA: what FSDP's bf16 mixed precision computes with (the trainer's default there).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention.register())
    lm.to(device)
    loss_config = LossConfig(divergence="fkl")
    root = StudentLoss(lm, loss_config, "sdpa" if spec["path"] == "mask" else spec["path"])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    if device.type == "cpu":
        from student_trainer.model import tune_cpu_runtime

        tune_cpu_runtime()  # as the trainer does on CPU (student_trainer.model.init_distributed)

    def step(tokens: int) -> int:
        mb = build_micro_batch(_groups(tokens, spec["sequences"], vocab), {}, block_mask=spec["path"] == "mask")
        teacher = _teacher(len(mb.rows_N), vocab, device, TeacherTensors)
        mb = mb.to(device)
        denominators = step_denominators(count_denominators(mb.inputs, loss_config), loss_config)
        loss, stats = root(mb, teacher, 0, denominators)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return stats.num_tokens

    return step


def _groups(tokens: int, sequences: int, vocab: int) -> list:
    import numpy as np

    from protos.records import RolloutRecord

    rng = np.random.default_rng(0)
    lengths = [tokens // sequences + (1 if i < tokens % sequences else 0) for i in range(sequences)]
    records = []
    for i, length in enumerate(lengths):
        prompt = min(PROMPT_TOKENS, max(1, length // 2))
        n = length - prompt
        records.append(
            RolloutRecord(
                rollout_id=f"r{i}",
                prompt_id="p",
                group_id="p",
                group_size=sequences,
                split="train",
                prompt_ids=rng.integers(0, vocab, prompt).astype(np.int32),
                response_ids=rng.integers(0, vocab, n).astype(np.int32),
                response_mask=np.ones(n, np.uint8),
                behaviour_logprobs=np.full(n, -2.0, np.float32),
                reward=1.0,
            )
        )
    return [records]


def _teacher(rows: int, vocab: int, device, scores_type):
    import math

    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    base = torch.randint(0, vocab, (rows, 1), generator=gen, device=device)
    ids = (base + torch.arange(TOP_K, device=device)) % vocab  # distinct ids per row
    topk = torch.full((rows, TOP_K), math.log(0.9 / TOP_K), device=device)
    return scores_type(
        token_logprobs=torch.full((rows,), -3.0, device=device),
        topk_ids=ids,
        topk_logprobs=topk,
        tail_logprobs=torch.full((rows,), math.log(0.1), device=device),
    )


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
