"""`opd bench openai`: one teacher's gRPC service vs its OpenAI-compatible port, on the same model.

1. Positions scored per second: the same sequences (top-k `--top-k`, every
   position but the first) through gRPC `ScoreStream` (`TeacherClient`) and
   through `POST /v1/completions` with `prompt_logprobs` (the trainer's HTTP
   source: `max_tokens: 0`, `echo`, JSON parsed back into arrays), each from
   `--clients` client processes, all requests of a client in flight at once.
2. Wire bytes per scored token for k in {0, 20, 64}: protobuf request + reply
   of `Score` (float32 and bfloat16 log-probs) vs the JSON request + reply of
   the OpenAI-compatible port (the same JSON vLLM's own server sends).
Both go through the same teacher process (its fair scheduler, auth and
metrics), so the difference is the protocol: encoding, bytes and parsing.
`--quick` runs on a tiny random model in about a minute (the smoke test);
its numbers say nothing about a real model. Numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Sequence

import numpy as np

from opd_apps.bench.common import WIRE_TOP_KS, Gate, bench_model_dir, grpc_wire, json_wire, service_tok_s

FULL = {"model": "embedded", "backend": "vllm", "num_seqs": 32, "seq_len": 256, "repeats": 3, "wire_len": 1000}
QUICK = {"model": "tiny", "backend": "hf", "num_seqs": 8, "seq_len": 64, "repeats": 1, "wire_len": 128}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench openai", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="HF model directory, `embedded` (default) or `tiny`")
    p.add_argument("--backend", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    p.add_argument("--num-seqs", type=int, help="sequences per pass (default 32)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    p.add_argument("--top-k", type=int, default=20, help="top-k of the throughput passes")
    p.add_argument("--repeats", type=int, help="timed passes per setting, best is reported (default 3)")
    p.add_argument("--wire-len", type=int, help="tokens of the sequence used for wire bytes (default 1000)")
    p.add_argument("--clients", type=int, default=1, help="client processes per protocol (default 1)")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--random-qwen2-0.5b", dest="random_model", action="store_true", help="see `opd bench teacher`")
    p.add_argument("--quick", action="store_true", help="smoke-run defaults: the tiny model, hf, 8 x 64 tokens")
    args = p.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.seq_len < 2 or args.wire_len < 2 or args.num_seqs < 1 or args.repeats < 1 or args.clients < 1:
        p.error("--seq-len and --wire-len must be >= 2; --num-seqs, --repeats and --clients >= 1")
    return args


def _openai_client_proc(url: str, model: str, seqs, top_k: int, repeats: int, start, ready, done) -> None:
    from student_trainer.score_sources.openai_client import OpenAIScoreClient

    async def run() -> None:
        client = OpenAIScoreClient([url], timeout_s=600, max_concurrency=max(1, len(seqs)))

        async def one_pass(batch) -> None:
            await asyncio.gather(*(client.score(model, s, 1, top_k) for s in batch))

        await one_pass(seqs[:2])  # connect + warm up
        ready.put(os.getpid())
        for _ in range(repeats):
            await asyncio.to_thread(start.wait)
            await one_pass(seqs)
            done.put(time.time())
        await client.close()

    asyncio.run(run())


def _openai_tok_s(url: str, model: str, seqs: list[np.ndarray], top_k: int, clients: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    starts = [ctx.Event() for _ in range(repeats)]
    procs = [
        ctx.Process(
            target=_openai_client_proc, args=(url, model, seqs[i::clients], top_k, repeats, Gate(starts), ready, done)
        )
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in range(clients):
        ready.get(timeout=900)
    best = float("inf")
    for r in range(repeats):
        t0 = time.time()
        starts[r].set()
        best = min(best, max(done.get(timeout=900) for _ in range(clients)) - t0)
    for proc in procs:
        proc.join(60)
    return sum(len(s) - 1 for s in seqs) / best


def _openai_wire(url: str, model: str, ids: np.ndarray) -> dict[int, tuple[int, int]]:
    return json_wire(f"{url}/completions", {"model": model, "prompt": ids.tolist(), "max_tokens": 0, "echo": True})


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from opd.logs import setup_logging
    from teacher_server.config import TeacherConfig
    from teacher_server.server import ServerThread

    setup_logging("WARNING")
    model_dir = bench_model_dir(args)
    engine = {"max_top_k": max(WIRE_TOP_KS), "dtype": args.dtype, "max_model_len": max(args.seq_len, args.wire_len) + 8}
    local = {"host": "127.0.0.1", "port": 0}
    config = TeacherConfig.model_validate(
        {"model": model_dir, "backend": args.backend, "engine": engine, "grpc": local, "ops": local, "openai": local}
    )
    thread = ServerThread(config).start()
    assert thread.server is not None and thread.server.engine is not None  # start() returns once it serves
    info = thread.server.engine.info
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, info.vocab_size, size=args.seq_len).astype(np.int32) for _ in range(args.num_seqs)]
    print(
        f"model {info.model_name} backend {info.backend} dtype {info.dtype} vocab {info.vocab_size}; "
        f"{args.num_seqs} x {args.seq_len} tokens, top-k {args.top_k}, {args.clients} client process(es), "
        f"best of {args.repeats}"
    )
    try:
        grpc_tok_s = service_tok_s(thread.address, seqs, args.top_k, args.clients, args.repeats)
        http_tok_s = _openai_tok_s(thread.openai_url, info.model_name, seqs, args.top_k, args.clients, args.repeats)
        wire_ids = rng.integers(0, info.vocab_size, size=args.wire_len).astype(np.int32)
        grpc_bytes = grpc_wire(thread.address, wire_ids)
        json_bytes = _openai_wire(thread.openai_url, info.model_name, wire_ids)
    finally:
        thread.stop()
    print(f"\n{'protocol':<34}{'positions/s':>14}{'vs gRPC':>10}")
    print(f"{'gRPC ScoreStream':<34}{grpc_tok_s:>14.0f}{1.0:>9.2f}x")
    print(f"{'OpenAI-compatible /v1/completions':<34}{http_tok_s:>14.0f}{http_tok_s / grpc_tok_s:>9.2f}x")
    positions = args.wire_len - 1
    print(f"\nwire bytes per scored token ({args.wire_len}-token sequence; request + reply, reply alone in brackets)")
    print(f"{'k':>4}{'gRPC float32':>22}{'gRPC bfloat16':>22}{'OpenAI JSON':>22}{'JSON / gRPC f32':>17}")
    for k in WIRE_TOP_KS:
        cells = [grpc_bytes[(k, "float32")], grpc_bytes[(k, "bfloat16")], json_bytes[k]]
        text = [f"{(c[0] + c[1]) / positions:.1f} ({c[1] / positions:.1f})" for c in cells]
        ratio = sum(json_bytes[k]) / sum(grpc_bytes[(k, "float32")])
        print(f"{k:>4}{text[0]:>22}{text[1]:>22}{text[2]:>22}{ratio:>16.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
