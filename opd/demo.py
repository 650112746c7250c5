"""`opd demo`: the main job on the embedded default model, run as separate processes.

For now (until the full distillation demo lands) it starts the teacher service
(`opd teacher --model embedded`) as its own process on free ports, waits until
it reports SERVING, asks it to `Generate` an answer to a prompt, scores that
answer token by token (`Score`, top-5 + tail mass), prints the table and the
service's metrics, and drains the teacher with SIGTERM. Ctrl-C leaves no
process behind.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from opd.processes import free_port, stop_process

PROMPT = "What is 17 + 25? Answer briefly."


def _start_teacher(backend: str, grpc_port: int, ops_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "opd", "teacher", "--model", "embedded", "--backend", backend,
           "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--ops-host", "127.0.0.1",
           "--ops-port", str(ops_port), "--engine-max-top-k", "20", "--engine-max-model-len", "2048",
           "--log-level", "WARNING"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _wait_ready(ops_port: int, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the teacher exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{ops_port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the teacher did not become ready in time")


def _show(tokenizer, client, prompt_ids: list[int]) -> None:
    gen = client.generate(prompt_ids, max_tokens=48, temperature=0.0)
    answer = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    print(f"\nprompt : {PROMPT}\nteacher: {answer.strip()}\n")
    full = np.concatenate([np.asarray(prompt_ids, np.int32), gen.token_ids])
    scores = client.score(full, len(prompt_ids), top_k=5)
    print(f"{'token':<16}{'log p':>8}{'tail':>8}   teacher's top-5")
    for i, tok in enumerate(gen.token_ids[:16]):
        top = ", ".join(repr(tokenizer.decode([t])) for t in scores.topk_ids[i])
        print(f"{tokenizer.decode([tok])!r:<16}{scores.token_logprobs[i]:>8.3f}{scores.tail_logprobs[i]:>8.2f}   {top}")
    print(f"... {len(gen.token_ids)} tokens scored; mean log-prob {scores.token_logprobs.mean():.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="teacher engine")
    args = parser.parse_args(argv)
    from teacher_server.client import TeacherClientSync
    from teacher_server.model_source import embedded_model_dir, load_tokenizer

    print("preparing the embedded teacher (SmolLM2-135M-Instruct; converted once, then cached) ...")
    tokenizer = load_tokenizer(embedded_model_dir())
    grpc_port, ops_port = free_port(), free_port()
    proc = _start_teacher(args.backend, grpc_port, ops_port)
    try:
        _wait_ready(ops_port, proc)
        print(f"teacher serving gRPC on 127.0.0.1:{grpc_port}; metrics at http://127.0.0.1:{ops_port}/metrics")
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        with TeacherClientSync(f"127.0.0.1:{grpc_port}", client_name="demo") as client:
            info = client.info()
            print(f"info   : {info.model_name} on {info.backend} ({info.dtype}), vocab {info.vocab_size}, "
                  f"tokenizer {info.tokenizer_fingerprint[:12]}...")
            _show(tokenizer, client, list(prompt_ids))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop_process(proc, 60, group=True)
    print("teacher drained and stopped.")
    return 0
