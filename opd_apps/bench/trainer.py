"""`opd bench trainer`: how much of the step waits for the teacher, at prefetch depth 0, 1 and 2;
with `--micro-batch-tokens T1,T2,...`, peak memory and tokens/s of one step per micro-batch size instead
(the mask vs the packed attention path; `opd_apps.bench.trainer_step`).

The teacher (`opd teacher --backend hf`) and the trainer (`opd train`) run as
separate processes pinned to different cores with `taskset`, so they behave
like separate nodes. The same synthetic rollouts (random tokens, fixed seed)
are pushed into a private Redis for every depth, so the rollout workers'
speed does not enter the measurement. Per depth: the share of step time
spent waiting for teacher scores, and trained tokens/s, after a warm-up step.
Not a test: results go to BENCHMARKS.md with the command. `--quick` runs the
same processes on tiny random models (the smoke test runs it); its numbers say
nothing about a real model.
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
from opd_apps.bench.common import local_hf_teacher_argv

_LINE = re.compile(r"teacher wait ([\d.]+)s\s+data wait ([\d.]+)s\s+compute ([\d.]+)s\s+tokens (\d+)")


# Sizes of a full run and of `--quick` (tiny random teacher and student, two depths: the smoke test).
FULL = {
    "teacher": "embedded",
    "steps": 6,
    "groups_per_step": 4,
    "group_size": 2,
    "prompt_len": 32,
    "response_len": 96,
    "depths": [0, 1, 2],
}
QUICK = {
    "teacher": "tiny",
    "steps": 2,
    "groups_per_step": 2,
    "group_size": 2,
    "prompt_len": 16,
    "response_len": 24,
    "depths": [0, 1],
}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher",
        help="teacher model dir, `embedded` (SmolLM2-135M, the default) or `tiny` (random "
        "tiny teacher and student built under OPD_CACHE_DIR)",
    )
    p.add_argument(
        "--student",
        default=None,
        help="student model dir (default: the teacher's weights; with `--teacher tiny`, the tiny student)",
    )
    p.add_argument("--steps", type=int, help="timed steps per depth, after one warm-up step (default 6)")
    p.add_argument("--groups-per-step", type=int, help="rollout groups per step (default 4)")
    p.add_argument("--group-size", type=int, help="samples per group (default 2)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per rollout (default 32)")
    p.add_argument("--response-len", type=int, help="response tokens per rollout (default 96)")
    p.add_argument("--top-k", type=int, default=20, help="teacher top-k the trainer asks for")
    p.add_argument("--depths", type=int, nargs="+", help="prefetch depths to measure (default 0 1 2)")
    p.add_argument(
        "--timeout-s", type=float, default=900.0, help="give up on a depth whose trainer has not finished by then"
    )
    p.add_argument("--teacher-cores", default="1", help="taskset cores of the teacher")
    p.add_argument("--trainer-cores", default="0", help="taskset cores of the trainer")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-run defaults: tiny random models, 2 timed steps of "
        "2 x 2 x (16 + 24) tokens, depths 0 and 1 (explicit flags still win)",
    )
    from opd_apps.bench.trainer_step import add_arguments

    add_arguments(p)
    args = p.parse_args(argv)
    if args.micro_batch_tokens:
        return args
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("steps", "groups_per_step", "group_size", "prompt_len", "response_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if min(args.depths) < 0:
        p.error(f"--depths must be 0 or more (got {args.depths})")
    return args


def _models(args: argparse.Namespace) -> tuple[str, str]:
    """(teacher dir, student dir)."""
    from opd.model_source import cache_dir, resolve_model_dir

    if args.teacher == "tiny":
        from opd_apps.demo.models import tiny_pair

        teacher, student = tiny_pair(cache_dir() / "demo")
        return str(teacher), args.student or str(student)
    teacher = str(resolve_model_dir(args.teacher))
    return teacher, args.student or teacher


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
            payloads.append(
                RolloutRecord(
                    rollout_id=f"p{g}@bench/{s}",  # `{prompt id}@{entry}/{sample index}`, as workers name them
                    prompt_id=f"p{g}",
                    group_id=f"p{g}",
                    group_size=args.group_size,
                    split="train",
                    prompt_ids=rng.integers(0, vocab, args.prompt_len).astype(np.int32),
                    response_ids=rng.integers(0, vocab, n).astype(np.int32),
                    response_mask=np.ones(n, np.uint8),
                    behaviour_logprobs=np.full(n, -2.0, np.float32),
                    reward=1.0,
                ).encode()
            )
    await producer.send_many(payloads)
    await redis.aclose()


def _taskset(cores: str) -> list[str]:
    return ["taskset", "-c", cores] if shutil.which("taskset") else []


def _run_depth(
    depth: int, url: str, teacher_addr: str, student: str, args: argparse.Namespace, vocab: int, workdir: str
) -> tuple[float, float]:
    namespace = f"bench-d{depth}"
    steps = args.steps + 1
    asyncio.run(_push_rollouts(url, namespace, args, vocab, args.groups_per_step * (steps + depth + 1)))
    cmd = [
        *_taskset(args.trainer_cores),
        sys.executable,
        "-m",
        "opd",
        "train",
        "--model",
        student,
        "--teacher-addresses",
        teacher_addr,
        "--teacher-top-k",
        str(args.top_k),
        "--redis-url",
        url,
        "--redis-namespace",
        namespace,
        "--loss-divergence",
        "fkl",
        "--batch-groups-per-step",
        str(args.groups_per_step),
        "--batch-prefetch-depth",
        str(depth),
        "--max-steps",
        str(steps),
        "--publish-every-steps",
        str(10 * steps),
        "--checkpoint-every-steps",
        str(10 * steps),
        "--publish-uri",
        f"{workdir}/w{depth}",
        "--checkpoint-dir",
        f"{workdir}/c{depth}",
        "--ops-port",
        "0",
        "--log-level",
        "WARNING",
    ]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=args.timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        raise RuntimeError(
            f"opd train did not finish {steps} steps within --timeout-s {args.timeout_s:g} at depth {depth} "
            f"(the rollouts it waits for may have been dead-lettered: see {namespace}:dead); its log:\n"
            + (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
        ) from None
    if out.returncode != 0:
        raise RuntimeError(f"opd train failed at depth {depth}:\n{out.stderr[-3000:]}")
    rows = [tuple(map(float, m.groups())) for m in _LINE.finditer(out.stdout)][1:]  # drop the warm-up step
    if not rows:
        raise RuntimeError(
            f"opd train printed no timed step lines at depth {depth} (expected lines matching "
            f"{_LINE.pattern!r}); its output:\n{out.stdout[-2000:]}"
        )
    teacher, data, compute, tokens = (sum(col) for col in zip(*rows, strict=True))
    return teacher / (teacher + data + compute), tokens / (teacher + data + compute)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    if args.micro_batch_tokens:  # the micro-batch step benchmark: no teacher, no Redis
        from opd_apps.bench.trainer_step import run

        return run(args)
    teacher, student = _models(args)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    workdir = tempfile.mkdtemp(prefix="opd-bench-trainer-")
    port, ops = free_port(), free_port()
    teacher_proc = subprocess.Popen(
        [
            *_taskset(args.teacher_cores),
            sys.executable,
            "-m",
            "opd",
            *local_hf_teacher_argv(teacher, port, ops),
            "--log-level",
            "WARNING",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )
    results = {}
    try:
        with redis_server() as url:
            for depth in args.depths:
                results[depth] = _run_depth(depth, url, f"127.0.0.1:{port}", student, args, vocab, workdir)
    finally:
        stop_process(teacher_proc, 30)
        shutil.rmtree(workdir, ignore_errors=True)
    tokens = args.groups_per_step * args.group_size * args.response_len
    print(
        f"teacher {teacher} (cores {args.teacher_cores}), student {student} (cores {args.trainer_cores}); "
        f"{tokens} trained tokens per step, top-{args.top_k}, {args.steps} timed steps per depth\n"
    )
    print(f"{'prefetch depth':>15}{'teacher wait share':>20}{'tokens/s':>12}{'vs depth 0':>12}")
    base = results.get(0, (0, 0))[1] or None
    for depth, (share, tok_s) in results.items():
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        print(f"{depth:>15}{share:>19.1%}{tok_s:>12.0f}{ratio:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
