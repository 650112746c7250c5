"""`opd bench trainer`: how much of the step waits for the teacher, at prefetch depth 0, 1 and 2.

The teacher (`opd teacher --backend hf`) and the trainer (`opd train`) run as
separate processes pinned to different cores with `taskset`, so they behave
like separate nodes. The same synthetic rollouts (random tokens, fixed seed)
are pushed into a private Redis for every depth, so the rollout workers'
speed does not enter the measurement. Per depth: the share of step time
spent waiting for teacher scores, and trained tokens/s, after a warm-up step.
Not a test: results go to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from opd.processes import free_port, stop_process
from opd.redis_server import redis_server

_LINE = re.compile(r"teacher wait ([\d.]+)s\s+data wait ([\d.]+)s\s+compute ([\d.]+)s\s+tokens (\d+)")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="embedded", help="teacher model dir or `embedded` (SmolLM2-135M)")
    p.add_argument("--student", default=None, help="student model dir (default: the teacher's weights)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per depth (after one warm-up step)")
    p.add_argument("--groups-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-cores", default="1", help="taskset cores of the teacher")
    p.add_argument("--trainer-cores", default="0", help="taskset cores of the trainer")
    return p.parse_args(argv)


async def _push_rollouts(url: str, namespace: str, args: argparse.Namespace, vocab: int, n_groups: int) -> None:
    from opd.streams import RedisConfig, StreamProducer, connect
    from protos.records import RolloutRecord

    rng = np.random.default_rng(0)
    redis = connect(RedisConfig(url=url, namespace=namespace))
    producer = StreamProducer(redis, f"{namespace}:rollouts", "trainer")
    payloads = []
    for g in range(n_groups):
        for s in range(args.group_size):
            n = args.response_len
            payloads.append(RolloutRecord(
                rollout_id=f"g{g}s{s}", prompt_id=f"p{g}", group_id=f"p{g}", group_size=args.group_size,
                split="train", prompt_ids=rng.integers(0, vocab, args.prompt_len).astype(np.int32),
                response_ids=rng.integers(0, vocab, n).astype(np.int32), response_mask=np.ones(n, np.uint8),
                behaviour_logprobs=np.full(n, -2.0, np.float32), reward=1.0).encode())
    await producer.send_many(payloads)
    await redis.aclose()


def _taskset(cores: str) -> list[str]:
    return ["taskset", "-c", cores] if shutil.which("taskset") else []


def _run_depth(depth: int, url: str, teacher_addr: str, student: str, args: argparse.Namespace, vocab: int,
               workdir: str) -> tuple[float, float]:
    namespace = f"bench-d{depth}"
    steps = args.steps + 1
    asyncio.run(_push_rollouts(url, namespace, args, vocab, args.groups_per_step * (steps + depth + 1)))
    cmd = [*_taskset(args.trainer_cores), sys.executable, "-m", "opd", "train", "--model", student,
           "--teacher-addresses", teacher_addr, "--teacher-top-k", str(args.top_k), "--redis-url", url,
           "--redis-namespace", namespace, "--loss-divergence", "fkl", "--batch-groups-per-step",
           str(args.groups_per_step), "--batch-prefetch-depth", str(depth), "--max-steps", str(steps),
           "--publish-every-steps", str(10 * steps), "--checkpoint-every-steps", str(10 * steps),
           "--publish-uri", f"{workdir}/w{depth}", "--checkpoint-dir", f"{workdir}/c{depth}", "--ops-port", "0",
           "--log-level", "WARNING"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"opd train failed at depth {depth}:\n{out.stderr[-3000:]}")
    rows = [tuple(map(float, m.groups())) for m in _LINE.finditer(out.stdout)][1:]  # drop the warm-up step
    teacher, data, compute, tokens = (sum(col) for col in zip(*rows, strict=True))
    return teacher / (teacher + data + compute), tokens / (teacher + data + compute)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    from teacher_server.model_source import resolve_model_dir

    teacher = str(resolve_model_dir(args.teacher))
    student = args.student or teacher
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    workdir = tempfile.mkdtemp(prefix="opd-bench-trainer-")
    port, ops = free_port(), free_port()
    teacher_proc = subprocess.Popen(
        [*_taskset(args.teacher_cores), sys.executable, "-m", "opd", "teacher", "--model", teacher, "--backend", "hf",
         "--engine-device", "cpu", "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--ops-host", "127.0.0.1",
         "--ops-port", str(ops), "--log-level", "WARNING"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    results = {}
    try:
        with redis_server() as url:
            for depth in args.depths:
                results[depth] = _run_depth(depth, url, f"127.0.0.1:{port}", student, args, vocab, workdir)
    finally:
        stop_process(teacher_proc, 30)
        shutil.rmtree(workdir, ignore_errors=True)
    tokens = args.groups_per_step * args.group_size * args.response_len
    print(f"teacher {teacher} (cores {args.teacher_cores}), student {student} (cores {args.trainer_cores}); "
          f"{tokens} trained tokens per step, top-{args.top_k}, {args.steps} timed steps per depth\n")
    print(f"{'prefetch depth':>15}{'teacher wait share':>20}{'tokens/s':>12}{'vs depth 0':>12}")
    base = results.get(0, (0, 0))[1] or None
    for depth, (share, tok_s) in results.items():
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        print(f"{depth:>15}{share:>19.1%}{tok_s:>12.0f}{ratio:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
