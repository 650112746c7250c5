"""The trainer files one training rollout touches, measured: the `student_trainer` code that runs for one step.

    PYTHONPATH=. python scripts/rollout_path.py [--divergence rkl_sampled] [--functions] [--json path] [--model DIR]

Runs `opd train`'s own loop (`student_trainer.__main__.run`) in this process on a tiny random model (the one
`opd demo --quick` builds), with a private Redis server and a real teacher over gRPC (hf backend, in a thread), as
the trainer's integration tests do. Rollouts are pushed straight onto `{ns}:rollouts` (no worker): one group of
two per step, `batch.prefetch_depth=0` (so the step that trains a rollout is the one that pulls it and asks its
teacher scores), publish and checkpoint every step. Python's profiler (`sys.setprofile`, and `threading.setprofile`
for the trainer's I/O thread) records every function of `student_trainer` that runs from the call of the last
`Trainer.step` to `TrainerRuntime.close`: one iteration of the loop (the step, `after_step`, the progress line),
and the functions on the stack when it starts (the loop itself: 0 calls). Start-up, the warm-up steps and module
import (code run under `importlib`) are left out.

Prints one line per file (functions run, calls) and the count; `--json` writes the same for a test to read. Give
`--model` a model directory to measure another checkout (`PYTHONPATH=<checkout>`): the files are counted under the
`student_trainer` package that Python imports.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class PathProfiler:
    """Counts the calls of functions defined under `root`, between the call of `start` and the call of `stop`
    (two code objects): `start` is counted, `stop` is not; module bodies and code run by an import are not."""

    def __init__(self, root: Path, start: Any, stop: Any, skip_starts: int = 0) -> None:
        self.root = str(root) + os.sep
        self.start, self.stop, self.skip_starts = start, stop, skip_starts
        self.active = False
        self.done = False
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        # hops: (caller file, callee file) -> calls, where the callee's nearest caller in the package is another file
        self.hops: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(self, frame, event: str, arg: Any) -> None:
        if event != "call" or self.done:
            return
        code = frame.f_code
        if code is self.start and not self.active:
            if self.skip_starts:
                self.skip_starts -= 1
                return
            self.active = True
            self._add_stack(frame.f_back)
        elif code is self.stop and self.active:
            self.active, self.done = False, True
            return
        if not self.active or not code.co_filename.startswith(self.root) or code.co_name == "<module>":
            return
        if _under_import(frame):
            return
        path = code.co_filename[len(self.root) :]
        self.calls[(path, code.co_qualname)] += 1
        caller = self._caller_file(frame.f_back)
        if caller is not None and caller != path:
            self.hops[(caller, path)] += 1

    def _caller_file(self, frame) -> str | None:
        """The file of the nearest function of the package below `frame` on the stack (through torch, asyncio)."""
        while frame is not None:
            code = frame.f_code
            if code.co_filename.startswith(self.root) and code.co_name != "<module>":
                return code.co_filename[len(self.root) :]
            frame = frame.f_back
        return None

    def _add_stack(self, frame) -> None:
        """The functions already running when the window opens (the training loop): counted with 0 calls."""
        while frame is not None:
            code = frame.f_code
            if code.co_filename.startswith(self.root) and code.co_name != "<module>":
                self.calls[(code.co_filename[len(self.root) :], code.co_qualname)] += 0
            frame = frame.f_back

    def files(self) -> dict[str, dict[str, int]]:
        """file (relative to the package) -> {function qualname: calls}, files sorted by path."""
        out: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (path, name), calls in sorted(self.calls.items()):
            out[path][name] = calls
        return dict(sorted(out.items()))

    def edges(self) -> dict[str, int]:
        """The "caller -> callee" file pairs crossed in the window, with the calls that crossed each."""
        return {f"{a} -> {b}": n for (a, b), n in sorted(self.hops.items())}

    def back_and_forth(self) -> list[str]:
        """File pairs crossed both ways ("a <-> b"): a calls into b and b calls back into a."""
        pairs = {(a, b) for a, b in self.hops if (b, a) in self.hops and a < b}
        return [f"{a} <-> {b}" for a, b in sorted(pairs)]


def _under_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def package_root() -> Path:
    spec = importlib.util.find_spec("student_trainer")
    assert spec is not None and spec.submodule_search_locations, "student_trainer is importable"
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def rollouts(steps: int, per_group: int = 2, tokens: int = 12, vocab: int = 384) -> list[Any]:
    """`steps` groups of `per_group` rollouts (random tokens below `vocab`), sampled at policy version 0."""
    import numpy as np

    from protos.records import RolloutRecord

    out = []
    for g in range(steps):
        rng = np.random.default_rng(g)
        for i in range(per_group):
            out.append(
                RolloutRecord(
                    rollout_id=f"g{g}/{i}",
                    prompt_id=f"g{g}",
                    group_id=f"g{g}",
                    group_size=per_group,
                    split="train",
                    prompt_ids=np.arange(5, dtype=np.int32),
                    response_ids=rng.integers(0, vocab, tokens).astype(np.int32),
                    response_mask=np.ones(tokens, np.uint8),
                    behaviour_logprobs=-rng.random(tokens).astype(np.float32),
                    reward=float(i % 2),
                    meta={"worker": "rollout_path"},
                )
            )
    return out


def push(redis_url: str, namespace: str, records: list[Any]) -> None:
    import asyncio

    from opd.streams import ROLLOUT_GROUP, RedisConfig, StreamKeys, StreamProducer, connect

    async def send() -> None:
        redis = connect(RedisConfig(url=redis_url))
        await StreamProducer(redis, StreamKeys(namespace).rollouts, ROLLOUT_GROUP).send_many(
            [r.encode() for r in records]
        )
        await redis.aclose()

    asyncio.run(send())


def start_teacher(model: Path):
    from teacher_server.config import TeacherConfig
    from teacher_server.server import ServerThread

    config = TeacherConfig.model_validate(
        {
            "model": str(model),
            "backend": "hf",
            "grpc": {"host": "127.0.0.1", "port": 0, "drain_grace_s": 2},
            "ops": {"host": "127.0.0.1", "port": 0},
        }
    )
    return ServerThread(config).start()


def trainer_config(model: Path, teacher: str, redis_url: str, run_dir: Path, steps: int, divergence: str):
    from student_trainer.config import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "model": str(model),
            "teacher": {"addresses": [teacher]},
            "redis": {"url": redis_url, "namespace": "rollout-path"},
            "loss": {"divergence": divergence},
            "batch": {"groups_per_step": 1, "prefetch_depth": 0, "read_block_ms": 100},
            "checkpoint": {"dir": str(run_dir / "ck"), "every_steps": 1},
            "publish": {"uri": str(run_dir / "weights"), "every_steps": 1},
            "ops": {"host": "127.0.0.1", "port": 0},
            "max_steps": steps,
        }
    )


def measure(
    model: Path | None, warmup_steps: int, work: Path, divergence: str = "rkl_sampled"
) -> tuple[Path, PathProfiler]:
    """Run `warmup_steps` + 1 steps of `opd train`'s loop; the package root and the profiler of the last step."""
    from opd.redis_server import redis_server

    if model is None:
        from opd_apps.demo.models import build_tiny_model

        model = build_tiny_model(work / "model")
    import student_trainer.__main__ as train_main
    from student_trainer.runtime import TrainerRuntime
    from student_trainer.trainer import Trainer

    steps = warmup_steps + 1
    root = package_root()
    profiler = PathProfiler(root, Trainer.step.__code__, TrainerRuntime.close.__code__, skip_starts=warmup_steps)
    teacher = start_teacher(model)
    try:
        with redis_server() as redis_url:
            push(redis_url, "rollout-path", rollouts(steps))
            config = trainer_config(model, teacher.address, redis_url, work, steps, divergence)
            threading.setprofile(profiler)  # the trainer's I/O thread starts inside run()
            sys.setprofile(profiler)
            try:
                with contextlib.redirect_stdout(sys.stderr):  # the progress lines
                    code = train_main.run(config)
            finally:
                sys.setprofile(None)
                threading.setprofile(None)
    finally:
        teacher.stop()
    if code != 0 or not profiler.done:
        raise RuntimeError(f"the training run did not finish its {steps} steps (exit {code})")
    return root, profiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps run before the one measured")
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: a new tiny model)")
    parser.add_argument("--divergence", default="rkl_sampled", help="loss.divergence (default: the config's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--functions", action="store_true", help="list each file's functions")
    parser.add_argument("--hops", action="store_true", help="list the file pairs a call crossed, with their calls")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opd-rollout-path-") as tmp:
        root, profiler = measure(args.model, args.warmup_steps, Path(tmp), args.divergence)
    files, edges, both_ways = profiler.files(), profiler.edges(), profiler.back_and_forth()
    step = args.warmup_steps + 1
    print(f"student_trainer files one training step runs (step {step}, {args.divergence}; start-up, imports aside):")
    print(f"  {'file':<36} {'functions':>9} {'calls':>7}")
    for path, functions in files.items():
        print(f"  {path:<36} {len(functions):>9} {sum(functions.values()):>7}")
        if args.functions:
            for name, calls in functions.items():
                print(f"      {name} ({calls or 'on the stack'})")
    if args.hops:
        print("hops between files (caller -> callee: calls):")
        for edge, calls in edges.items():
            print(f"  {edge}: {calls}")
    print(f"files: {len(files)}  functions: {sum(len(f) for f in files.values())}  package: {root}")
    print(f"hops: {len(edges)} file pairs crossed, {sum(edges.values())} crossing calls; both ways: {len(both_ways)}")
    for pair in both_ways:
        print(f"  {pair}")
    if args.json is not None:
        result = {
            "step": step,
            "divergence": args.divergence,
            "root": str(root),
            "files": files,
            "hops": edges,
            "both_ways": both_ways,
        }
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
