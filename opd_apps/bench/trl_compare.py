"""`opd bench trl`: opd's pipeline against TRL's own on-policy distillation, on the demo's job.

Both sides distil the demo's teacher into the demo's truncated student (`opd_apps.demo.models`) on the demo's
task (`opd_apps.demo.task`: the plural of a noun), with one recipe: the same prompts in the same order, the same
learning rate and warm-up (then constant), prompts per step, samples per prompt, max new tokens and sampling
temperature, forward KL of the teacher over the student on the student's own samples, and the same number of
trained samples. The two runs go back to back (opd first), each with the load average at its start and end:

1. **opd**: a private Redis, `opd teacher` (hf backend, CPU), one `opd rollout` worker and `opd train
   --data-prompts`, each its own process, as `opd demo` runs them; the divergence is forward KL over the
   teacher's top-k plus the tail bucket (the demo's loss); weights published every step.
2. **TRL**: `trl.DistillationTrainer` (TRL 1.16: fully on-policy, `beta=0` is forward KL over the full vocabulary)
   in one process, run by `opd_apps/bench/trl_job.py` in a virtual environment of its own (`--trl-venv`;
   created on first use with `pip install trl==1.16.0 torch==2.13.0`; TRL is never a dependency of opd).

Then both trained students are scored by the same `opd eval` (hf backend, the same seeds) on the same held-out
prompts against the same teacher service: task score (pass@1 of the task's reward) and divergence (mean
forward KL over the teacher's top-k + tail, nats/token). Reported per side: wall time (processes started to
trainer exit), training span (first to last step), trained tokens/s and samples/s over the span, held-out
divergence and task score after the same number of trained samples, and the time (since the first step) at
which the per-step training divergence, averaged over 3 steps, first reaches the level both sides reach.

Does not: run vLLM (both sides generate with transformers on the CPU), or train on more than one process per side.
`--quick` runs the same flow on the tiny random pair for a few steps (the slow test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from opd.processes import ONE_THREAD_ENV, free_port
from opd_apps.bench.common import REPO_ROOT, local_hf_teacher_argv

TRL_PINS = ("trl==1.16.0", "torch==2.13.0")
# opd's three processes take one thread each (as `opd demo` runs them); TRL's one process gets the machine's cores.
_CORES = str(os.cpu_count() or 1)
TRL_THREADS = {**ONE_THREAD_ENV, "OMP_NUM_THREADS": _CORES, "MKL_NUM_THREADS": _CORES}
JOB = Path(__file__).with_name("trl_job.py")
VENV_MISSING = 3  # exit code: the TRL environment cannot be installed here


@dataclass(frozen=True)
class Recipe:
    """The one recipe both sides train with (the demo's, `opd_apps.demo.pipeline`)."""

    steps: int = 12
    prompts_per_step: int = 8
    samples: int = 2
    max_tokens: int = 16
    lr: float = 1e-4
    warmup_steps: int = 3
    temperature: float = 1.0
    top_k: int = 20  # opd's teacher top-k (the TRL side uses the full vocabulary)
    seed: int = 0
    eval_limit: int | None = None  # held-out prompts scored (None: all 120)
    eval_samples: int = 2

    @property
    def trained_samples(self) -> int:
        return self.steps * self.prompts_per_step * self.samples


QUICK = Recipe(steps=3, prompts_per_step=2, samples=2, max_tokens=8, lr=5e-3, warmup_steps=0, eval_limit=4)


@dataclass
class SideResult:
    side: str
    wall_s: float = 0.0
    span_s: float = 0.0
    steps: int = 0
    trained_samples: int = 0
    trained_tokens: float = 0.0
    tokens_per_s: float = 0.0
    samples_per_s: float = 0.0
    load_start: float = 0.0
    load_end: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (s since the first step, training divergence)
    eval: dict = field(default_factory=dict)
    time_to_divergence_s: float | None = None
    breakdown_s: dict[str, float] = field(default_factory=dict)  # where the steps' time went, summed over steps


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    from opd.model_source import cache_dir

    p = argparse.ArgumentParser(prog="opd bench trl", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random models, a few steps (the slow test)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 12; quick 3)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out prompts")
    p.add_argument("--trl-venv", default=str(cache_dir() / "trl-venv"), help="TRL's own virtual environment")
    p.add_argument("--python", default="python3.11", help="interpreter that creates --trl-venv (torch 2.13 wheels)")
    p.add_argument("--sides", default="opd,trl", help="sides to run, comma-separated (opd, trl)")
    p.add_argument("--keep-dir", default=None, help="keep logs, models and eval reports under this directory")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _models(quick: bool) -> tuple[Path, Path]:
    from opd.model_source import cache_dir
    from opd_apps.demo.models import demo_models, tiny_pair

    return tiny_pair(cache_dir() / "demo") if quick else demo_models()


def ensure_trl_venv(venv: Path, python: str) -> tuple[Path | None, str]:
    """(the venv's python, "") once `trl` imports there, creating the venv on first use; (None, why) if it cannot."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return py, ""
    print(f"installing {' '.join(TRL_PINS)} into {venv} (once) ...", flush=True)
    steps = [[python, "-m", "venv", str(venv)], [str(py), "-m", "pip", "install", "-q", *TRL_PINS]]
    for command in steps:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(command[:3])}: {exc}"
        if proc.returncode != 0:
            return None, f"{' '.join(command[:3])} failed: {(proc.stderr or proc.stdout).strip()[-600:]}"
    done = subprocess.run(check, capture_output=True, text=True)
    return (py, "") if done.returncode == 0 else (None, f"trl does not import: {done.stderr.strip()[-600:]}")


def prompt_order(recipe: Recipe) -> list[dict]:
    """The training prompts both sides see, in order: the demo's training file shuffled with the recipe's seed,
    `steps x prompts_per_step` of them (each side samples `samples` answers per prompt)."""
    import random

    from opd_apps.demo.pipeline import DATA

    rows = [json.loads(line) for line in (DATA / "demo_train.jsonl").read_text().splitlines() if line.strip()]
    random.Random(recipe.seed).shuffle(rows)
    wanted = recipe.steps * recipe.prompts_per_step
    return [rows[i % len(rows)] for i in range(wanted)]


def run_opd(root: Path, models: tuple[Path, Path], teacher: str, redis_url: str, recipe: Recipe) -> SideResult:
    """opd's pipeline (one hf worker, the trainer) to `recipe.steps`; its figures and final weights dir."""
    from opd_apps.demo.supervisor import Supervisor

    run = root / "opd"
    prompts = run / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_order(recipe)))
    sup = Supervisor(run / "logs")
    result = SideResult("opd", load_start=os.getloadavg()[0])
    started = time.time()
    try:
        sup.start("worker", _worker_argv(models[1], redis_url, recipe), env=ONE_THREAD_ENV)
        train_argv = _train_argv(models[1], teacher, redis_url, run, prompts, recipe)
        trainer = sup.start("trainer", train_argv, env=ONE_THREAD_ENV)
        while trainer.proc.poll() is None:
            sup.check()
            time.sleep(0.5)
        if trainer.proc.returncode != 0:
            raise RuntimeError(f"opd train exited with {trainer.proc.returncode}:\n{trainer.tail(30)}")
    finally:
        sup.stop_all()
    result.wall_s, result.load_end = time.time() - started, os.getloadavg()[0]
    lines = [json.loads(x) for x in (run / "checkpoints" / "steps.jsonl").read_text().splitlines() if x.strip()]
    steps = [(line["time"], len(line["rollouts"]), line["stats"]["tokens"], line["stats"]["loss"]) for line in lines]
    _fill(result, steps)
    for key in ("data_wait_s", "teacher_wait_s", "compute_s"):  # the trainer's own split of its step time
        result.breakdown_s[key] = sum(line["stats"].get(key) or 0.0 for line in lines)
    versions = sorted((run / "weights").glob("v*"), key=lambda p: p.name)
    shutil.copytree(versions[-1], run / "final", ignore=shutil.ignore_patterns("*.tmp*"))
    return result


def _worker_argv(student: Path, redis_url: str, recipe: Recipe) -> list[str]:
    return [
        "rollout", "--model", str(student), "--backend", "hf", "--redis-url", redis_url,
        "--redis-namespace", "bench-trl", "--ops-host", "127.0.0.1", "--ops-port", str(free_port()),
        "--sampling-max-tokens", str(recipe.max_tokens), "--sampling-temperature", str(recipe.temperature),
        "--engine-max-model-len", "512",
    ]  # fmt: skip


def _train_argv(student: Path, teacher: str, redis_url: str, run: Path, prompts: Path, recipe: Recipe) -> list[str]:
    return [
        "train", "--model", str(student), "--teacher-addresses", teacher, "--redis-url", redis_url,
        "--redis-namespace", "bench-trl", "--data-prompts", str(prompts),
        "--data-source-n-samples", str(recipe.samples), "--data-source-epochs", "1",
        "--batch-groups-per-step", str(recipe.prompts_per_step), "--batch-max-staleness", "2",
        "--loss-divergence", "fkl", "--teacher-top-k", str(recipe.top_k),
        "--optim-lr", str(recipe.lr), "--optim-warmup-steps", str(recipe.warmup_steps),
        "--publish-uri", str(run / "weights"), "--publish-prune-grace-s", "60",
        "--checkpoint-dir", str(run / "checkpoints"), "--checkpoint-every-steps", str(recipe.steps),
        "--max-steps", str(recipe.steps), "--ops-port", "0", "--log-level", "WARNING",
    ]  # fmt: skip


def run_trl(root: Path, models: tuple[Path, Path], python: Path, recipe: Recipe) -> SideResult:
    """TRL's DistillationTrainer in its own venv (`trl_job.py`), the same recipe; its figures and final model."""
    run = root / "trl"
    run.mkdir(parents=True, exist_ok=True)
    job = {
        "teacher": str(models[0]),
        "student": str(models[1]),
        "prompts": [r["prompt"] for r in prompt_order(recipe)],
        "out": str(run),
        **{k: v for k, v in asdict(recipe).items() if k not in ("eval_limit", "eval_samples")},
    }
    (run / "job.json").write_text(json.dumps(job))
    result = SideResult("trl", load_start=os.getloadavg()[0])
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRL_THREADS, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # A copy, run isolated: beside the original, opd_apps/bench/queue.py would shadow the standard library's queue.
    script = shutil.copy(JOB, run / JOB.name)
    with open(run / "trl.log", "w") as log:
        proc = subprocess.run([str(python), "-I", script, str(run / "job.json")], stdout=log, stderr=log, env=env)
    result.wall_s, result.load_end = time.time() - started, os.getloadavg()[0]
    if proc.returncode != 0:
        tail = (run / "trl.log").read_text().splitlines()[-30:]
        raise RuntimeError(f"the TRL job exited with {proc.returncode}:\n" + "\n".join(tail))
    lines = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines() if x.strip()]
    _fill(result, [(x["time"], x["samples"], x["tokens"], x["loss"]) for x in lines])
    result.breakdown_s["generate_s"] = sum(x["gen_s"] for x in lines)  # sampling; the rest of a step trains
    result.breakdown_s["step_s"] = sum(x["step_s"] for x in lines)
    return result


def _fill(result: SideResult, steps: list[tuple[float, int, float, float]]) -> None:
    """Throughput over the span from the first step's end to the last one's (start-up and step 1 left out), and
    the training-divergence curve, from per-step (time, samples, tokens, divergence)."""
    result.steps = len(steps)
    result.trained_samples = sum(s[1] for s in steps)
    result.trained_tokens = sum(s[2] for s in steps)
    result.span_s = steps[-1][0] - steps[0][0] if len(steps) > 1 else float("nan")
    if result.span_s > 0:
        result.tokens_per_s = sum(s[2] for s in steps[1:]) / result.span_s
        result.samples_per_s = sum(s[1] for s in steps[1:]) / result.span_s
    result.curve = [(t - steps[0][0], loss) for t, _, _, loss in steps]


def smoothed(curve: list[tuple[float, float]], window: int = 3) -> list[tuple[float, float]]:
    """The trailing mean of the divergence over `window` steps, from the `window`-th step on."""
    values = [v for _, v in curve]
    return [(curve[i][0], sum(values[i + 1 - window : i + 1]) / window) for i in range(window - 1, len(curve))]


def time_to_reach(curve: list[tuple[float, float]], level: float) -> float | None:
    """Seconds since the first step at which the smoothed divergence first is <= `level` (None: never)."""
    return next((t for t, v in smoothed(curve) if v <= level), None)


def evaluate(model: Path, teacher: str, out: Path, recipe: Recipe) -> dict:
    """`opd eval` of one trained student on the held-out prompts: task score and divergence to the teacher."""
    from opd_apps.demo.pipeline import DATA

    argv = [
        sys.executable, "-m", "opd", "eval", "--model", str(model), "--prompts", str(DATA / "demo_heldout.jsonl"),
        "--teacher-addresses", teacher, "--teacher-top-k", str(recipe.top_k), "--backend", "hf",
        "--reward-function", "opd_apps.demo.task:reward", "--sampling-n", str(recipe.eval_samples),
        "--sampling-temperature", str(recipe.temperature), "--sampling-max-tokens", str(recipe.max_tokens),
        "--engine-max-model-len", "512", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    if recipe.eval_limit:
        argv += ["--dataset-limit", str(recipe.eval_limit)]
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **ONE_THREAD_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"opd eval of {model} failed:\n{proc.stderr[-2000:]}")
    report = json.loads((out / "eval.json").read_text())
    metrics = report["teacher"]["metrics"]
    return {
        "pass_at_1": report["pass_at_k"]["1"]["value"],
        "forward_kl_topk_tail": metrics["forward_kl_topk_tail"]["value"],
        "prompts": report["prompts"]["count"],
        "eval_s": time.time() - started,
    }


def compare(results: dict[str, SideResult]) -> None:
    """Time to the divergence both sides reach: the larger of the two smoothed minima."""
    floors = [min(v for _, v in smoothed(r.curve)) for r in results.values() if len(r.curve) >= 3]
    if len(floors) == len(results) and floors:
        level = max(floors)
        for r in results.values():
            r.time_to_divergence_s = time_to_reach(r.curve, level)
            r.eval["common_level"] = level


def _table(results: dict[str, SideResult], recipe: Recipe) -> str:
    rows = [
        ("wall time, processes started to trainer exit (s)", lambda r: f"{r.wall_s:.0f}"),
        ("training span, first to last step (s)", lambda r: f"{r.span_s:.0f}"),
        ("steps / trained samples", lambda r: f"{r.steps} / {r.trained_samples}"),
        ("trained tokens/s (over the span)", lambda r: f"{r.tokens_per_s:.1f}"),
        ("trained samples/s (over the span)", lambda r: f"{r.samples_per_s:.2f}"),
        ("held-out divergence, fkl top-k+tail (nats/token)", lambda r: _num(r.eval.get("forward_kl_topk_tail"))),
        ("held-out task score, pass@1", lambda r: _num(r.eval.get("pass_at_1"))),
        ("time to the common training divergence (s)", lambda r: _num(r.time_to_divergence_s, "{:.0f}")),
        ("load average at start / end", lambda r: f"{r.load_start:.1f} / {r.load_end:.1f}"),
        ("step time split, summed (s)", lambda r: " ".join(f"{k[:-2]} {v:.0f}" for k, v in r.breakdown_s.items())),
    ]
    names = list(results)
    out = [
        f"{recipe.trained_samples} trained samples per side ({recipe.steps} steps x {recipe.prompts_per_step} "
        f"prompts x {recipe.samples} samples, up to {recipe.max_tokens} tokens, lr {recipe.lr:g})",
        f"{'':52}" + "".join(f"{n:>14}" for n in names),
    ]
    out += [f"{label:52}" + "".join(f"{fmt(results[n]):>14}" for n in names) for label, fmt in rows]
    if "opd" in results and "trl" in results and results["trl"].tokens_per_s > 0:
        out.append(f"opd / trl trained tokens/s: {results['opd'].tokens_per_s / results['trl'].tokens_per_s:.2f}x")
    return "\n".join(out)


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    recipe = QUICK if args.quick else Recipe()
    recipe = replace(recipe, steps=args.steps or recipe.steps, eval_limit=args.eval_limit or recipe.eval_limit)
    sides = [s for s in args.sides.split(",") if s]
    if not sides or any(s not in ("opd", "trl") for s in sides):
        print("opd bench trl: --sides takes opd, trl", file=sys.stderr)
        return 2
    python = None
    if "trl" in sides:
        python, why = ensure_trl_venv(Path(args.trl_venv), args.python)
        if python is None:
            print(f"opd bench trl: the TRL environment cannot be installed here: {why}", file=sys.stderr)
            return VENV_MISSING
    from opd.redis_server import redis_server
    from opd_apps.demo.supervisor import Supervisor

    models = _models(args.quick)
    root = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="opd-bench-trl-"))
    results: dict[str, SideResult] = {}
    try:
        with redis_server() as redis_url:
            sup, port = Supervisor(root / "teacher-logs"), free_port()
            teacher_argv = [*local_hf_teacher_argv(models[0], port, free_port()), "--engine-max-top-k", "64"]
            sup.start("teacher", teacher_argv, env=ONE_THREAD_ENV)
            teacher = f"127.0.0.1:{port}"
            try:
                for side in sides:
                    if side == "opd":
                        results[side] = run_opd(root, models, teacher, redis_url, recipe)
                        final = root / "opd" / "final"
                    else:
                        assert python is not None, "the venv was made above"
                        results[side] = run_trl(root, models, python, recipe)
                        final = root / "trl" / "final"
                    print(f"  {side}: trained in {results[side].wall_s:.0f} s; evaluating ...", flush=True)
                    results[side].eval = evaluate(final, teacher, root / f"eval-{side}", recipe)
            finally:
                sup.stop_all()
    finally:
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    compare(results)
    print(_table(results, recipe))
    if args.out:
        payload = {"recipe": asdict(recipe), "results": {k: asdict(v) for k, v in results.items()}}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
