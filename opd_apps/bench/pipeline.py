"""`opd bench pipeline`: the whole pipeline end to end, under both prompt admission rules, in one run.

Starts a private `redis-server` and one teacher (`opd teacher`, hf backend), then per run N rollout workers
(`opd rollout`, hf backend, each its own process and ops port) and `opd train --data-prompts`, every one a
process, at the frozen defaults (`batch.max_staleness` 4, weights published every step, 4 groups x 2
samples per step, prefetch depth 1). Each repeat runs the trainer once with `data.admission=version` (the prompt
admitted only while its group, sampled at the oldest live worker's loaded version, would be trained within the
staleness bound) and once with `data.admission=inflight` (the older in-flight count), alternating, in their own
Redis namespaces; the teacher is shared. Reported per admission, median over the repeats:

- trained samples/s: rollouts trained between the first step's line in `steps.jsonl` and the last one;
- stale-dropped share: rollouts dropped as stale / rollouts pulled (`steps.jsonl`);
- empty steps (batches that were all stale: nothing trained, not counted as steps) and prompts fed again
  (`prompts.jsonl`, event `refed`);
- the trainer's data-wait and teacher-wait shares of its step time (`stats.data_wait_s`, `teacher_wait_s`,
  `compute_s`), as `opd bench trainer` measures the teacher-wait share for one process;
- worker idle share: the share of samples (every 0.25 s, each worker's `/metrics`) with no prompt group being
  sampled (`opd_rollout_inflight_prompts` = 0), between the trainer's first and last step;
- weight-load time per version: `opd_rollout_weight_reload_seconds` sum / count over the workers;
- mean staleness of the trained samples (`trained_staleness` in `steps.jsonl`).

Tiny random models (the demo's `--quick` pair) by default; `--demo-models` uses the demo's teacher and truncated
student. `--quick` is the smoke-test size (a few steps, one repeat). Prints a table and, with `--out`, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from opd.processes import ONE_THREAD_ENV, free_port
from opd.redis_server import redis_server
from opd_apps.bench.common import local_hf_teacher_argv

ADMISSIONS = ("version", "inflight")
FROZEN = {"max_staleness": 4, "groups_per_step": 4, "samples": 2, "publish_every": 1}


@dataclass
class RunResult:
    admission: str
    steps: int = 0
    trained: int = 0
    trained_per_s: float = 0.0
    stale_share: float = 0.0
    empty_steps: int = 0
    refed: int = 0
    data_wait_share: float = 0.0
    teacher_wait_share: float = 0.0
    worker_idle_share: float = 0.0
    weight_load_s: float = 0.0
    mean_staleness: float = 0.0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench pipeline", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size: a few steps, one repeat")
    p.add_argument("--steps", type=int, default=None, help="trainer steps per run (default 60; quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="runs per admission rule (default 3; quick 1)")
    p.add_argument("--workers", type=int, default=1, help="rollout worker processes per run")
    p.add_argument("--max-tokens", type=int, default=16, help="sampled tokens per response")
    p.add_argument("--admissions", default=",".join(ADMISSIONS), help="admission rules to run, comma-separated")
    p.add_argument("--demo-models", action="store_true", help="the demo's teacher and truncated student")
    p.add_argument("--keep-dir", default=None, help="keep every run's logs and checkpoints under this directory")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _models(args: argparse.Namespace) -> tuple[Path, Path]:
    """(teacher, student) directories."""
    from opd.model_source import cache_dir
    from opd_apps.demo.models import demo_models, tiny_pair

    return demo_models() if args.demo_models else tiny_pair(cache_dir() / "demo")


def _worker_args(student: Path, redis_url: str, namespace: str, port: int, max_tokens: int) -> list[str]:
    return [
        "rollout",
        "--model",
        str(student),
        "--backend",
        "hf",
        "--redis-url",
        redis_url,
        "--redis-namespace",
        namespace,
        "--ops-host",
        "127.0.0.1",
        "--ops-port",
        str(port),
        "--sampling-max-tokens",
        str(max_tokens),
        "--engine-max-model-len",
        "512",
    ]


def _train_args(student: Path, teacher: str, redis_url: str, ns: str, run: Path, steps: int, admission: str):
    from opd_apps.demo.pipeline import DATA

    return [
        "train",
        "--model",
        str(student),
        "--teacher-addresses",
        teacher,
        "--redis-url",
        redis_url,
        "--redis-namespace",
        ns,
        "--data-prompts",
        str(DATA / "demo_train.jsonl"),
        "--data-source-n-samples",
        str(FROZEN["samples"]),
        "--data-source-epochs",
        "20",
        "--data-admission",
        admission,
        "--batch-groups-per-step",
        str(FROZEN["groups_per_step"]),
        "--batch-max-staleness",
        str(FROZEN["max_staleness"]),
        "--publish-every-steps",
        str(FROZEN["publish_every"]),
        "--publish-uri",
        str(run / "weights"),
        "--publish-prune-grace-s",
        "30",
        "--checkpoint-dir",
        str(run / "checkpoints"),
        "--checkpoint-every-steps",
        str(steps),
        "--loss-divergence",
        "fkl",
        "--max-steps",
        str(steps),
        "--ops-port",
        "0",
        "--log-level",
        "WARNING",
    ]


class IdleSampler:
    """Samples each worker's `opd_rollout_inflight_prompts` every `every_s` in a thread: (time, all idle?) pairs."""

    def __init__(self, ports: list[int], every_s: float = 0.25) -> None:
        self.ports, self.every_s = ports, every_s
        self.samples: list[tuple[float, int, int]] = []  # (time, workers idle, workers answering)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-sampler", daemon=True)

    def __enter__(self) -> IdleSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.wait(self.every_s):
                idle = answering = 0
                for port in self.ports:
                    value = _metric(client, port, "opd_rollout_inflight_prompts")
                    if value is not None:
                        answering += 1
                        idle += value == 0
                self.samples.append((time.time(), idle, answering))

    def idle_share(self, start: float, end: float) -> float:
        window = [(idle, n) for t, idle, n in self.samples if start <= t <= end and n]
        return sum(i for i, _ in window) / max(1, sum(n for _, n in window))


def _metric(client: httpx.Client, port: int, name: str) -> float | None:
    """The sum of a metric's samples on a worker's /metrics (None: the worker does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = client.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.HTTPError:
        return None
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _weight_load_s(ports: list[int]) -> float:
    """Mean seconds per version loaded, over the workers."""
    with httpx.Client(timeout=5) as client:
        total = sum(_metric(client, p, "opd_rollout_weight_reload_seconds_sum") or 0.0 for p in ports)
        count = sum(_metric(client, p, "opd_rollout_weight_reload_seconds_count") or 0.0 for p in ports)
    return total / count if count else float("nan")


def summarize(admission: str, run: Path, idle_share: float, weight_load_s: float, wall_s: float) -> RunResult:
    """One run's figures from its `steps.jsonl` and `prompts.jsonl` (and what was sampled from the workers)."""
    lines = _jsonl(run / "checkpoints" / "steps.jsonl")
    refed = sum(1 for line in _jsonl(run / "checkpoints" / "prompts.jsonl") if line.get("event") == "refed")
    trained = sum(len(line["rollouts"]) for line in lines)
    dropped = sum(line["dropped_stale"] for line in lines)
    times = {k: sum(line["stats"].get(k) or 0.0 for line in lines) for k in ("data_wait_s", "teacher_wait_s")}
    total_s = sum(
        sum(line["stats"].get(k) or 0.0 for k in ("data_wait_s", "teacher_wait_s", "compute_s")) for line in lines
    )
    after_first = sum(len(line["rollouts"]) for line in lines[1:])
    span_s = lines[-1]["time"] - lines[0]["time"] if len(lines) > 1 else float("nan")
    lags = [lag for line in lines for lag in line.get("trained_staleness", [])]
    return RunResult(
        admission=admission,
        steps=len(lines),
        trained=trained,
        trained_per_s=after_first / span_s if span_s == span_s and span_s > 0 else float("nan"),
        stale_share=dropped / max(1, trained + dropped),
        empty_steps=sum(line.get("empty_steps", 0) for line in lines),
        refed=refed,
        data_wait_share=times["data_wait_s"] / max(total_s, 1e-9),
        teacher_wait_share=times["teacher_wait_s"] / max(total_s, 1e-9),
        worker_idle_share=idle_share,
        weight_load_s=weight_load_s,
        mean_staleness=statistics.fmean(lags) if lags else float("nan"),
        wall_s=wall_s,
        extra={"dropped_stale": dropped},
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_once(sup_dir: Path, models: tuple[Path, Path], teacher: str, redis_url: str, args, admission: str, i: int):
    """One pipeline run: N workers and the trainer under `admission`, to `steps`; its figures."""
    from opd_apps.demo.supervisor import Supervisor

    run = sup_dir / f"{admission}-{i}"
    sup = Supervisor(run / "logs")
    ns = f"bench-{admission}-{i}-{int(time.time())}"
    ports = [free_port() for _ in range(args.workers)]
    started = time.time()
    try:
        for w, port in enumerate(ports):
            sup.start(f"worker{w}", _worker_args(models[1], redis_url, ns, port, args.max_tokens), env=ONE_THREAD_ENV)
        trainer = sup.start("trainer", _train_args(models[1], teacher, redis_url, ns, run, args.steps, admission))
        with IdleSampler(ports) as sampler:
            while trainer.proc.poll() is None:
                sup.check()
                time.sleep(0.5)
        if trainer.proc.returncode != 0:
            raise RuntimeError(f"trainer exited with {trainer.proc.returncode}:\n{trainer.tail(30)}")
        weight_load_s = _weight_load_s(ports)
    finally:
        sup.stop_all()
    lines = _jsonl(run / "checkpoints" / "steps.jsonl")
    window = (lines[0]["time"], lines[-1]["time"]) if lines else (started, time.time())
    return summarize(admission, run, sampler.idle_share(*window), weight_load_s, time.time() - started)


def median_of(results: list[RunResult]) -> dict:
    keys = [k for k, v in asdict(results[0]).items() if isinstance(v, (int, float)) and k != "admission"]
    return {k: statistics.median(getattr(r, k) for r in results) for k in keys}


def _table(medians: dict[str, dict], repeats: int) -> str:
    rows = [
        ("trained samples/s", "trained_per_s", "{:.2f}"),
        ("stale-dropped share", "stale_share", "{:.1%}"),
        ("empty steps", "empty_steps", "{:g}"),
        ("prompts fed again", "refed", "{:g}"),
        ("trainer data-wait share", "data_wait_share", "{:.1%}"),
        ("trainer teacher-wait share", "teacher_wait_share", "{:.1%}"),
        ("worker idle share", "worker_idle_share", "{:.1%}"),
        ("weight load per version (s)", "weight_load_s", "{:.3f}"),
        ("mean staleness of trained (versions)", "mean_staleness", "{:.2f}"),
        ("run wall time (s)", "wall_s", "{:.0f}"),
    ]
    names = list(medians)
    out = [f"median of {repeats} run(s) per admission rule", f"{'':38}" + "".join(f"{n:>12}" for n in names)]
    for label, key, fmt in rows:
        out.append(f"{label:38}" + "".join(f"{fmt.format(medians[n][key]):>12}" for n in names))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    args.steps = args.steps or (4 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 3)
    admissions = [a for a in args.admissions.split(",") if a]
    if any(a not in ADMISSIONS for a in admissions):
        print(f"opd bench pipeline: --admissions takes {', '.join(ADMISSIONS)}", file=sys.stderr)
        return 2
    from opd_apps.demo.supervisor import Supervisor

    models = _models(args)
    root = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="opd-bench-pipeline-"))
    results: dict[str, list[RunResult]] = {a: [] for a in admissions}
    try:
        with redis_server() as redis_url:
            sup = Supervisor(root / "teacher-logs")
            port = free_port()
            sup.start("teacher", _teacher_args(models[0], port), env=ONE_THREAD_ENV)
            try:
                for i in range(repeats):
                    for admission in admissions if i % 2 == 0 else admissions[::-1]:
                        result = run_once(root, models, f"127.0.0.1:{port}", redis_url, args, admission, i)
                        results[admission].append(result)
                        print(f"  {admission} run {i + 1}: {json.dumps(asdict(result))}", flush=True)
            finally:
                sup.stop_all()
    finally:
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    medians = {a: median_of(r) for a, r in results.items()}
    print(_table(medians, repeats))
    if args.out:
        payload = {"medians": medians, "runs": {a: [asdict(r) for r in rs] for a, rs in results.items()}}
        payload["settings"] = {**FROZEN, "steps": args.steps, "workers": args.workers, "repeats": repeats}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _teacher_args(model: Path, port: int) -> list[str]:
    return local_hf_teacher_argv(model, port, free_port())


if __name__ == "__main__":
    raise SystemExit(main())
