"""`opd bench teacher`: the service's overhead and wire cost, each against a baseline measured in the same run.

1. Throughput: positions scored per second by the backend called in-process
   (the engine's `score_batch`, as a colocated trainer would call it) vs the
   same sequences through the gRPC service with 1 and 4 (`--clients`)
   concurrent client processes (each its own channel and stream).
   Ratio = service / in-process.
2. Wire bytes per scored token for k in {0, 20, 64}: the protobuf request and
   reply of `Score` (float32 and bfloat16 log-probs) vs vLLM's OpenAI-compatible
   `/v1/completions` with `prompt_logprobs=k` (JSON), started here with
   `python -m vllm.entrypoints.openai.api_server` on the same model.
Not a test: numbers go to BENCHMARKS.md with the command that produced them.
`--quick` runs every part on a tiny random model in about a minute (the smoke
test runs it); its numbers say nothing about a real model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from opd.processes import free_port, stop_process
from opd_apps.bench.common import WIRE_TOP_KS, bench_model_dir, grpc_wire, json_wire, service_tok_s

# Sizes of a full run and of `--quick` (a tiny random model and a few short sequences: the smoke test).
FULL = {
    "model": "embedded",
    "backend": "vllm",
    "num_seqs": 32,
    "seq_len": 256,
    "repeats": 3,
    "wire_len": 1000,
    "clients": [1, 4],
}
QUICK = {
    "model": "tiny",
    "backend": "hf",
    "num_seqs": 8,
    "seq_len": 64,
    "repeats": 1,
    "wire_len": 128,
    "clients": [1, 2],
}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench teacher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="HF model directory, `embedded` (SmolLM2-135M-Instruct, the default) or `tiny` "
        "(a random tiny model built under OPD_CACHE_DIR)",
    )
    p.add_argument("--backend", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    p.add_argument("--num-seqs", type=int, help="sequences per pass (default 32)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, all but the first scored (default 256)")
    p.add_argument("--top-k", type=int, default=20, help="top-k for the throughput passes")
    p.add_argument("--repeats", type=int, help="timed passes per setting, best is reported (default 3)")
    p.add_argument("--wire-len", type=int, help="tokens of the sequence used for wire bytes (default 1000)")
    p.add_argument("--clients", type=int, nargs="+", help="concurrent client processes per service run (default 1 4)")
    p.add_argument("--skip-json", action="store_true", help="skip the vLLM OpenAI-server JSON baseline")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument(
        "--random-qwen2-0.5b",
        dest="random_model",
        action="store_true",
        help="score with random weights in Qwen2.5-0.5B's shape (vocab 151,936) instead of --model: "
        "realistic cost where no model hub is reachable (e.g. on a GPU box)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-run defaults: the tiny model on the hf backend, "
        "8 x 64 tokens, one pass, 1 and 2 clients, 128-token wire sequence (explicit flags still win)",
    )
    args = p.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("num_seqs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.seq_len < 2 or args.wire_len < 2:
        p.error("--seq-len and --wire-len must be at least 2 (the first token of a sequence is not scored)")
    if min(args.clients) < 1:
        p.error(f"--clients must be positive (got {args.clients})")
    return args


def _inprocess_tok_s(thread, seqs: list[np.ndarray], top_k: int, repeats: int, batch_tokens: int) -> float:
    from teacher_server.engine import ScoreWork

    works = [ScoreWork(s, 1, top_k) for s in seqs]
    batches, cur, cur_tokens = [], [], 0
    for w in works:  # the batches a colocated caller would form with the same token budget
        if cur and cur_tokens + w.num_tokens > batch_tokens:
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(w)
        cur_tokens += w.num_tokens
    batches.append(cur)
    engine = thread.server.engine

    async def one_pass() -> float:
        import asyncio

        t0 = time.perf_counter()
        await asyncio.gather(*(engine.score_batch(b) for b in batches))
        return time.perf_counter() - t0

    thread.call(one_pass())  # warm-up
    best = min(thread.call(one_pass()) for _ in range(repeats))
    return sum(w.num_positions for w in works) / best


def _json_wire(model_dir: str, ids: np.ndarray, dtype: str) -> dict[int, tuple[int, int]]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-logprobs",
        "64",
        "--max-model-len",
        str(len(ids) + 8),
    ]
    if dtype != "auto":
        cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("vLLM's OpenAI server did not start (run it by hand to see why)")
            time.sleep(1)
        request = {"model": model_dir, "prompt": ids.tolist(), "max_tokens": 1}
        return json_wire(f"{url}/v1/completions", request)
    finally:
        stop_process(proc)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from opd.logs import setup_logging
    from teacher_server.config import TeacherConfig
    from teacher_server.server import ServerThread

    setup_logging("WARNING")
    model_dir = bench_model_dir(args)
    engine = {"max_top_k": max(WIRE_TOP_KS), "dtype": args.dtype, "max_model_len": max(args.seq_len, args.wire_len) + 8}
    config = TeacherConfig.model_validate(
        {
            "model": model_dir,
            "backend": args.backend,
            "engine": engine,
            "grpc": {"host": "127.0.0.1", "port": 0},
            "ops": {"host": "127.0.0.1", "port": 0},
        }
    )
    thread = ServerThread(config).start()
    assert thread.server is not None and thread.server.engine is not None  # start() returns once it serves
    info = thread.server.engine.info
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, info.vocab_size, size=args.seq_len).astype(np.int32) for _ in range(args.num_seqs)]
    print(
        f"model {info.model_name} backend {info.backend} dtype {info.dtype} vocab {info.vocab_size}; "
        f"{args.num_seqs} x {args.seq_len} tokens, top-k {args.top_k}, best of {args.repeats}"
    )
    try:
        base = _inprocess_tok_s(thread, seqs, args.top_k, args.repeats, config.scheduler.max_batch_tokens)
        print(f"\n{'setting':<28}{'positions/s':>14}{'vs in-process':>16}")
        print(f"{'in-process backend':<28}{base:>14.0f}{1.0:>15.2f}x")
        for clients in args.clients:
            tok_s = service_tok_s(thread.address, seqs, args.top_k, clients, args.repeats)
            print(f"{f'gRPC service, {clients} client(s)':<28}{tok_s:>14.0f}{tok_s / base:>15.2f}x")
        wire_ids = rng.integers(0, info.vocab_size, size=args.wire_len).astype(np.int32)
        grpc_bytes = grpc_wire(thread.address, wire_ids)
    finally:
        thread.stop()
    json_bytes = {} if args.skip_json else _json_wire(model_dir, wire_ids, args.dtype)
    positions = args.wire_len - 1
    print(f"\nwire bytes per scored token ({args.wire_len}-token sequence; request + reply, reply alone in brackets)")
    print(f"{'k':>4}{'gRPC float32':>22}{'gRPC bfloat16':>22}{'vLLM JSON':>22}{'JSON / gRPC bf16':>18}")
    for k in WIRE_TOP_KS:
        cells = [grpc_bytes[(k, "float32")], grpc_bytes[(k, "bfloat16")], json_bytes.get(k)]
        text = [f"{(c[0] + c[1]) / positions:.1f} ({c[1] / positions:.1f})" if c else "skipped" for c in cells]
        ratio = (sum(json_bytes[k]) / sum(grpc_bytes[(k, "bfloat16")])) if k in json_bytes else float("nan")
        print(f"{k:>4}{text[0]:>22}{text[1]:>22}{text[2]:>22}{ratio:>17.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
