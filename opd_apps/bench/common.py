"""What several benchmarks share: the model a run measures, concurrent client processes, and wire bytes.

- `bench_model_dir`: `--model tiny` (the demo's tiny random pair), `--random-model` (random weights in
  Qwen2.5-0.5B's shape) or any model name `opd.model_source` resolves;
- `service_tok_s`: positions per second of a gRPC teacher service under N client processes, each its own
  channel, started together per pass through `Gate` (the best of `repeats` passes);
- `grpc_wire` and `json_wire`: request and reply bytes of one sequence for each k in `WIRE_TOP_KS`, through
  `Score` (float32 and bfloat16 log-probs, with the 5-byte gRPC frame) and as JSON with `prompt_logprobs=k`.

Used by `opd bench teacher` and `opd bench openai`; measures nothing on its own and prints nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from protos import teacher_pb2

WIRE_TOP_KS = (0, 20, 64)


REPO_ROOT = Path(__file__).resolve().parents[2]
_OOM_MARKERS = ("MemoryError", "can't allocate", "out of memory")


def run_isolated(argv: list[str], timeout_s: float) -> dict:
    """Run `python -m <argv...>` in a process of its own (so its memory peak is its own) and return the dict of
    its `RESULT {json}` line, or `{"status": ...}`: a timeout, out of memory (killed, or the allocator said so),
    or the exit code with the last line of its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if proc.returncode in (-9, 137) or any(m.lower() in proc.stderr.lower() for m in _OOM_MARKERS):
        return {"status": "out of memory"}
    return {"status": f"error (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}


def local_hf_teacher_argv(model: str | Path, port: int, ops_port: int) -> list[str]:
    """`opd` arguments of a CPU hf teacher serving `model` on 127.0.0.1 (gRPC `port`, ops `ops_port`)."""
    return [
        "teacher", "--model", str(model), "--backend", "hf", "--engine-device", "cpu",
        "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--ops-host", "127.0.0.1", "--ops-port", str(ops_port),
    ]  # fmt: skip


def bench_model_dir(args: argparse.Namespace) -> str:
    """The directory of the model a run measures: `--random-model`, `--model tiny` or a model name."""
    if args.random_model:
        return random_qwen2_half_b()
    from opd.model_source import cache_dir, resolve_model_dir

    if args.model == "tiny":
        from opd_apps.demo.models import tiny_pair

        return str(tiny_pair(cache_dir() / "demo")[0])
    return str(resolve_model_dir(args.model))


def random_qwen2_half_b() -> str:
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


def service_tok_s(address: str, seqs: list[np.ndarray], top_k: int, clients: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    starts = [ctx.Event() for _ in range(repeats)]
    shares = [seqs[i::clients] for i in range(clients)]
    procs = []
    for i in range(clients):
        gate = Gate(starts)
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


class Gate:
    """Each client waits on the event of its next pass (picklable for spawn)."""

    def __init__(self, events) -> None:
        self._events, self._i = events, 0

    def wait(self) -> None:
        self._events[self._i].wait()
        self._i += 1


def _wire_bytes(ids: np.ndarray, k: int, dtype: teacher_pb2.DType, reply) -> tuple[int, int]:
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


def grpc_wire(address: str, ids: np.ndarray) -> dict[tuple[int, str], tuple[int, int]]:
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
