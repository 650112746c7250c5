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
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from opd.processes import free_port, stop_process

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
WIRE_TOP_KS = (0, 20, 64)


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


def _model_dir(args: argparse.Namespace) -> str:
    if args.random_model:
        return _random_qwen2_half_b()
    from opd.model_source import cache_dir, resolve_model_dir

    if args.model == "tiny":
        from opd_apps.demo_models import tiny_pair

        return str(tiny_pair(cache_dir() / "demo")[0])
    return str(resolve_model_dir(args.model))


def _random_qwen2_half_b() -> str:
    """Save a random-weight model with Qwen2.5-0.5B's shape (bf16) and a tokenizer; return its directory."""
    import tempfile

    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    path = tempfile.mkdtemp(prefix="opd-bench-qwen2-")
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(151936)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1")
    tok.save_pretrained(path)
    return path


def _client_proc(address: str, seqs: list[np.ndarray], top_k: int, repeats: int, start, ready, done) -> None:
    from teacher_server.client import TeacherClientSync

    with TeacherClientSync(address, timeout_s=600) as client:
        client.score_many([(s, 1) for s in seqs[:2]], top_k=top_k)  # connect + warm up
        ready.put(os.getpid())
        for _ in range(repeats):
            start.wait()
            client.score_many([(s, 1) for s in seqs], top_k=top_k)
            done.put(time.time())


def _service_tok_s(address: str, seqs: list[np.ndarray], top_k: int, clients: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    starts = [ctx.Event() for _ in range(repeats)]
    shares = [seqs[i::clients] for i in range(clients)]
    procs = []
    for i in range(clients):
        gate = _Gate(starts)
        procs.append(ctx.Process(target=_client_proc, args=(address, shares[i], top_k, repeats, gate, ready, done)))
    for proc in procs:
        proc.start()
    for _ in range(clients):  # every client connected and warmed up before the first timed pass
        ready.get(timeout=900)
    best = float("inf")
    for r in range(repeats):
        t0 = time.time()
        starts[r].set()
        ends = [done.get(timeout=900) for _ in range(clients)]
        best = min(best, max(ends) - t0)
    for proc in procs:
        proc.join(60)
    return sum(len(s) - 1 for s in seqs) / best


class _Gate:
    """Each client waits on the event of its next pass (picklable for spawn)."""

    def __init__(self, events) -> None:
        self._events, self._i = events, 0

    def wait(self) -> None:
        self._events[self._i].wait()
        self._i += 1


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


def _wire_bytes(ids: np.ndarray, k: int, dtype: int, reply) -> tuple[int, int]:
    from protos import teacher_pb2 as pb
    from protos.arrays import pack

    request = pb.ScoreRequest(
        request_id="0" * 32, token_ids=pack(ids, pb.INT32), score_from=1, top_k=k, logprob_dtype=dtype
    )
    return request.ByteSize() + 5, reply.ByteSize() + 5  # + the 5-byte gRPC message frame


def json_wire(endpoint: str, request: dict) -> dict[int, tuple[int, int]]:
    """k -> (request bytes, reply bytes) of `request` with `prompt_logprobs: k` POSTed as JSON to `endpoint`."""
    import httpx

    out = {}
    for k in WIRE_TOP_KS:
        body = json.dumps({**request, "prompt_logprobs": k})
        r = httpx.post(endpoint, content=body, headers={"content-type": "application/json"}, timeout=600)
        r.raise_for_status()
        out[k] = (len(body), len(r.content))
    return out


def _grpc_wire(address: str, ids: np.ndarray) -> dict[tuple[int, str], tuple[int, int]]:
    import grpc

    from protos import teacher_pb2 as pb
    from protos import teacher_pb2_grpc as pb_grpc
    from protos.arrays import pack

    out = {}
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 28)]) as ch:
        stub = pb_grpc.TeacherStub(ch)
        for k in WIRE_TOP_KS:
            for name, dtype in (("float32", pb.FLOAT32), ("bfloat16", pb.BFLOAT16)):
                req = pb.ScoreRequest(
                    request_id="0" * 32, token_ids=pack(ids, pb.INT32), score_from=1, top_k=k, logprob_dtype=dtype
                )
                out[(k, name)] = _wire_bytes(ids, k, dtype, stub.Score(req, timeout=600))
    return out


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
    model_dir = _model_dir(args)
    engine = {"max_top_k": max(WIRE_TOP_KS), "dtype": args.dtype, "max_model_len": max(args.seq_len, args.wire_len) + 8}
    config = TeacherConfig(
        model=model_dir,
        backend=args.backend,
        engine=engine,
        grpc={"host": "127.0.0.1", "port": 0},
        ops={"host": "127.0.0.1", "port": 0},
    )
    thread = ServerThread(config).start()
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
            tok_s = _service_tok_s(thread.address, seqs, args.top_k, clients, args.repeats)
            print(f"{f'gRPC service, {clients} client(s)':<28}{tok_s:>14.0f}{tok_s / base:>15.2f}x")
        wire_ids = rng.integers(0, info.vocab_size, size=args.wire_len).astype(np.int32)
        grpc_bytes = _grpc_wire(thread.address, wire_ids)
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
