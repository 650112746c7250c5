"""`opd bench tenants`: four students sharing one teacher pinned to one core — flood, saturation, weights.

The teacher (`--backend hf`, the default, or `vllm`: vLLM's CPU build, its
engine-core process on the same core) runs as its own process pinned to one
CPU core (`sched_setaffinity` + one torch/OpenMP thread), with a tokens file naming
four students; the load generator runs on the other cores, one gRPC channel
per student, raw `Score` calls without client retries, so every status the
teacher answers is counted as answered.

0. Capacity: the four students together keep 8, 32, then 128 requests in
   flight; C = the best answered requests/s (a batching server's throughput
   depends on how full its batches are).
1. Solo: student-a alone at a fixed rate R = load x C / 3: its p50 latency.
2. (a) Flood: student-a, -b, -c each at R (together `--load` of C), student-d
   at `--flood-factor` x R. Expected: each well-behaved student answered at
   >= 0.8 R with p50 latency within 2x of solo, and the flooder turned away
   with RESOURCE_EXHAUSTED + a retry-after hint.
3. (b) Saturation: all four keep requests outstanding, with sequences of
   0.5, 1, 1.5 and 2 x `--seq-len` tokens; the share of scored tokens of each,
   read from the teacher's per-client counters on its ops `/metrics` over a
   window where all four are backlogged. Expected: 25% +/- 5% each (fair
   share is by tokens, so the students with short sequences get more
   requests answered).
4. (c) Weighted: the tokens file is rewritten with weights 2:1:1:1 (the
   running teacher re-reads it) and (b) is repeated. Expected: 40/20/20/20%
   +/- 5%.
Steps 0-2 run twice per run, on two teachers running side by side on the
same core: the current scheduler and today's behaviour
(`--no-scheduler-express-lane`: one fair queue). Capacity is measured in
alternating windows (per level: A B B A A B ..., `--capacity-windows` per
teacher, together `--capacity-s`), so that load from other jobs on the
machine hits both alike; each adjacent pair (A B or B A) gives one ratio
new / old, and the run's capacity ratio is the median of the pairs' ratios
at the level where the two teachers together answered the most (its spread
printed beside it). Beside it, per teacher, the counts that say why one
does less work per second: engine batches and their mean tokens, express
dispatches and bulk parks (teacher `/metrics`), the teacher's CPU time per
answered request and the share of its core it got (`/proc`: other jobs
take the rest). Solo and flood run
on one teacher, then the other (the order alternates between runs); steps
3-4 on the current one. `--runs` runs (3) and the median of each figure; the
ratios (capacity new / old, p50 / solo) are taken within a run, which
matters on a machine shared with other jobs.
Not a test: the numbers go to BENCHMARKS.md with the command. `--quick` runs
every phase for a few seconds on the tiny random model, once (the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import httpx

from opd.processes import ONE_THREAD_ENV, free_port, stop_process
from opd_apps.bench.tenant_load import (
    Tally,
    Tenant,
    completion_rate,
    histogram_p50_ms,
    metrics_delta,
    open_loop_process,
    read_client_metrics,
)

FULL = {"model": "tiny", "seq_len": 128, "phase_s": 30.0, "capacity_s": 10.0, "capacity_windows": 6, "runs": 3}
QUICK = {"model": "tiny", "seq_len": 64, "phase_s": 5.0, "capacity_s": 2.0, "capacity_windows": 2, "runs": 1}
TENANTS = ("student-a", "student-b", "student-c", "student-d")  # student-d floods in (a)
SHARE_LENGTHS = (0.5, 1.0, 1.5, 2.0)  # (b), (c): each student's sequence length, in units of --seq-len
CAPACITY_IN_FLIGHT = (8, 32, 128)  # requests kept in flight while capacity is measured
CAPACITY_WARMUP_S = 0.5  # before each capacity window: the four students' requests in flight, the batches full
WEIGHTS = (2.0, 1.0, 1.0, 1.0)  # (c)
# today's behaviour: one fair queue (and on vllm up to max_inflight_batches batches in the engine, not a token bound)
SCHEDULERS = {"new": [], "old": ["--no-scheduler-express-lane", "--scheduler-bulk-engine-steps=0"]}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench tenants", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="HF model directory, `embedded` or `tiny` (a random tiny model; the default)")
    p.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="the teachers' engine (vllm: the CPU build, one engine per teacher, its engine core on the same core)",
    )
    p.add_argument("--seq-len", type=int, help="tokens per request in the capacity, solo and flood phases (128)")
    p.add_argument("--phase-s", type=float, help="seconds of the solo, flood and saturation phases (30)")
    p.add_argument("--capacity-s", type=float, help="seconds of each capacity measurement, per teacher and level (10)")
    p.add_argument(
        "--capacity-windows",
        type=int,
        help="windows each --capacity-s is cut into, alternating A B B A between the teachers; each adjacent "
        "pair gives one ratio new/old (6)",
    )
    p.add_argument("--load", type=float, default=0.3, help="share of capacity the three well-behaved students use")
    p.add_argument("--flood-factor", type=float, default=10.0, help="the flooder's rate, in units of R")
    p.add_argument("--top-k", type=int, default=20, help="top-k of every request")
    p.add_argument(
        "--outstanding",
        type=int,
        default=80,
        help="(b): requests each student keeps in flight: at least twice its fair share of a batch, so it stays "
        "backlogged while its replies travel (the scheduler, not the clients, decides the shares), and all four "
        "together at most a batch + the queue bound (nobody is turned away)",
    )
    p.add_argument("--timeout-s", type=float, default=120.0, help="deadline of every request (the trainer's is 300 s)")
    p.add_argument("--core", type=int, default=0, help="the CPU core the teacher is pinned to")
    p.add_argument(
        "--teacher-arg",
        action="append",
        default=[],
        metavar="FLAG=VALUE",
        help="extra `opd teacher` flag, e.g. --teacher-arg=--scheduler-max-batch-requests=8 (repeatable)",
    )
    p.add_argument(
        "--new-teacher-arg",
        action="append",
        default=[],
        metavar="FLAG=VALUE",
        help="extra `opd teacher` flag for the new scheduler's teacher only, to compare a setting against today's "
        "behaviour in the same run, e.g. --new-teacher-arg=--engine-vllm-max-num-batched-tokens=512 (repeatable)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=384,
        help="the teacher's queue bound (scheduler.max_queued_requests); small so the flood reaches it in seconds",
    )
    p.add_argument(
        "--students-in",
        choices=("processes", "one-loop"),
        default="processes",
        help="solo and flood: each student's load generator in a process of its own, as separate teams are "
        "(processes), or all four on this process's one event loop (one-loop: the layout before 2026-12-08, where "
        "a light student's replies waited behind the flooder's in one loop)",
    )
    p.add_argument("--runs", type=int, help="runs to take the median of (3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes: tiny model, 64 tokens, 5 s phases, 1 run")
    args = p.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.seq_len < 4:
        p.error(f"--seq-len must be at least 4 (got {args.seq_len})")
    if not 0 < args.load < 1:
        p.error(f"--load is a share of capacity in (0, 1) (got {args.load})")
    if args.phase_s <= 0 or args.capacity_s <= 0 or args.flood_factor <= 1 or args.outstanding < 1 or args.runs < 1:
        p.error("--phase-s and --capacity-s must be > 0, --flood-factor > 1, --outstanding and --runs >= 1")
    if args.capacity_windows < 1:
        p.error(f"--capacity-windows must be >= 1 (got {args.capacity_windows})")
    if args.core not in os.sched_getaffinity(0):
        p.error(f"--core {args.core} is not one of this process's CPUs {sorted(os.sched_getaffinity(0))}")
    return args


def _model_dir(name: str) -> str:
    from opd.model_source import cache_dir, resolve_model_dir

    if name == "tiny":
        from opd_apps.demo.models import tiny_pair

        return str(tiny_pair(cache_dir() / "demo")[0])
    return str(resolve_model_dir(name))


class PinnedTeacher:
    """`opd teacher` (`--backend`: hf, or vllm's CPU build) as a child process on one core, one thread, auth on."""

    def __init__(self, args: argparse.Namespace, model_dir: str, tokens_file: Path, extra: Sequence[str] = ()) -> None:
        self.grpc_port, self.ops_port = free_port(), free_port()
        self.tokens_file = tokens_file
        max_len = int(max(SHARE_LENGTHS) * args.seq_len) + 8
        cmd = [sys.executable, "-m", "opd", "teacher", "--model", model_dir, "--backend", args.backend]
        cmd += ["--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--log-level", "WARNING"]
        cmd += ["--ops-host", "127.0.0.1", "--ops-port", str(self.ops_port), "--auth-tokens-file", str(tokens_file)]
        cmd += ["--engine-max-model-len", str(max_len), "--engine-max-top-k", str(max(args.top_k, 1))]
        cmd += ["--scheduler-max-queued-requests", str(args.max_queued_requests), *args.teacher_arg, *extra]
        self.command = cmd
        core = args.core
        env = {**os.environ, **ONE_THREAD_ENV}
        if args.backend == "vllm":  # its engine-core process binds its OpenMP threads itself: to the same core
            env |= {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the teacher exited with {self.proc.returncode}: {' '.join(self.command)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.ops_url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the teacher was not ready within {timeout_s:.0f} s: {' '.join(self.command)}")

    def write_tokens(self, tokens: dict[str, str], weights: dict[str, float] | None = None) -> None:
        """The tokens file, replaced atomically; with `weights` in the team form (the teacher re-reads it)."""
        lines = [
            f"{n}: {{token: {t}, weight: {weights[n]:g}}}\n" if weights else f"{n}: {t}\n" for n, t in tokens.items()
        ]
        staged = self.tokens_file.with_suffix(".new")
        staged.write_text("".join(lines))
        staged.replace(self.tokens_file)

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the teacher process and its live descendants (vLLM's engine
        core) have used so far (Linux /proc)."""
        stats: dict[int, list[str]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):  # a process that ended meanwhile
                    stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        tree, grew = {self.proc.pid}, True
        while grew:  # fields after the name: state, ppid, ...; utime and stime are fields 14 and 15
            found = {pid for pid, f in stats.items() if int(f[1]) in tree} - tree
            tree, grew = tree | found, bool(found)
        ticks = sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in tree if pid in stats)
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process(self.proc, grace_s=15)


async def _vocab_size(address: str, token: str) -> int:
    import grpc

    from protos import teacher_pb2 as pb
    from protos import teacher_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.TeacherStub(channel).Info(
            pb.InfoRequest(), timeout=60, metadata=(("authorization", f"Bearer {token}"),)
        )
    return reply.vocab_size


async def _saturated(
    tenants: list[Tenant],
    outstanding: list[int],
    window_s: float,
    args: argparse.Namespace,
    ops_url: str,
    weights: dict[str, float] | None = None,
    warmup_s: float = 1.0,
    cpu_s: Callable[[], float] | None = None,
):
    """`tenants` keep `outstanding` requests in flight; per-client metrics over a `window_s` window after a
    `warmup_s` warm-up and, with `weights`, once the teacher's /metrics show it applies them (it re-reads an
    edited tokens file on its own schedule, later on a loaded machine). Returns (metrics delta, tallies); the
    delta also holds the window's measured length (`window_s`) and, with `cpu_s`, the teacher's CPU seconds
    in it (`cpu_s`)."""
    stop = asyncio.Event()
    runs = [asyncio.create_task(t.saturate(n, stop, args.timeout_s)) for t, n in zip(tenants, outstanding, strict=True)]
    await asyncio.sleep(warmup_s)
    before = await asyncio.to_thread(read_client_metrics, ops_url)
    deadline = time.monotonic() + 60
    while weights and any(before["weights"].get(n) != w for n, w in weights.items()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the teacher did not apply weights {weights} within 60 s: {before['weights']}")
        await asyncio.sleep(0.2)
        before = await asyncio.to_thread(read_client_metrics, ops_url)
    started, cpu_started = time.monotonic(), cpu_s() if cpu_s else 0.0
    await asyncio.sleep(window_s)
    after = await asyncio.to_thread(read_client_metrics, ops_url)
    ended = time.monotonic()
    delta = metrics_delta(before, after) | {"window_s": ended - started}
    if cpu_s:
        delta["cpu_s"] = cpu_s() - cpu_started
    stop.set()
    tallies = await asyncio.gather(*runs)
    delta["rate"] = completion_rate([t for tally in tallies for t in tally.ok_at_s if started <= t <= ended])
    return delta, tallies


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def flood_rows(args: argparse.Namespace, one: dict) -> dict[str, dict[str, float]]:
    """Per student in (a): answered/R, p50/solo, refusals, other errors, median retry hint (s), sent/s, p50 ms."""
    rate, solo = one["rate"], one["solo"]
    rows = {}
    for name, tally in zip(TENANTS, one["flood"], strict=True):
        hints = sorted(tally.retry_hints_s)
        rows[name] = {
            "sent": sum(tally.codes.values()) / args.phase_s,
            "per_rate": tally.ok / args.phase_s / rate,
            "p50_ms": tally.p50_ms(),
            "per_solo": tally.p50_ms() / solo.p50_ms(),
            "exhausted": float(tally.codes["RESOURCE_EXHAUSTED"]),
            "other": float(tally.errors - tally.codes["RESOURCE_EXHAUSTED"]),
            "hint_s": hints[len(hints) // 2] if hints else float("nan"),
        }
    return rows


def share_rows(one: dict, phase: str) -> dict[str, float]:
    """Each student's share of the scored tokens in (b) `share` or (c) `weighted`."""
    scored = one[f"{phase}_metrics"]["scored"]
    total = sum(scored.get(n, 0.0) for n in TENANTS)
    return {n: scored.get(n, 0.0) / total if total else float("nan") for n in TENANTS}


def _express_note(one: dict) -> str:
    """During (a): the share of student-a/b/c's answered requests served in the express lane, and the times a
    running bulk batch parked for an express one (both from the teacher's /metrics)."""
    flood = one["flood_metrics"]
    express = sum(flood["express"].get(n, 0.0) for n in TENANTS[:3])
    answered = sum(flood["requests"].get(n, {}).get(("Score", "OK"), 0.0) for n in TENANTS[:3])
    if not express:
        return ""
    parked = flood["bulk_yields"]
    return f"; express {express / max(answered, 1.0):.0%} of a/b/c's answers, bulk batches parked {parked:.0f}x"


def _server_note(one: dict) -> str:
    """The teacher's own Score p50 (its latency histogram) for student-a solo and a/b/c in the flood, beside the
    client's: what the load generator and the network add."""
    if "solo_metrics" not in one:
        return ""

    def pair(tally: Tally, metrics: dict, name: str) -> str:
        return f"{tally.p50_ms():.1f}/{histogram_p50_ms(metrics['score_le'].get(name, {})):.1f}"

    light = " ".join(pair(t, one["flood_metrics"], n) for t, n in zip(one["flood"], TENANTS[:3], strict=False))
    return f"; p50 ms client/server: solo {pair(one['solo'], one['solo_metrics'], TENANTS[0])}, flood {light}"


def format_run(args: argparse.Namespace, out: dict, run: int) -> str:
    """A few lines per run, so that each run's figures are on record beside the medians."""
    lines = [f"run {run + 1} (load average {out['load_average']:.1f}):"]
    for name in ("new", "old"):
        one, rows = out[name], flood_rows(args, out[name])
        well = [rows[n] for n in TENANTS[:3]]
        lines.append(
            f"  {name}: C {one['capacity']:.1f} req/s (at {one['capacity_at']} in flight), R {one['rate']:.2f}, "
            f"solo p50 {one['solo'].p50_ms():.1f} ms; flood answered/R "
            + "/".join(f"{r['per_rate']:.2f}" for r in well)
            + ", p50/solo "
            + "/".join(f"{r['per_solo']:.2f}" for r in well)
            + f", flooder refused {rows[TENANTS[3]]['exhausted']:.0f}"
            + _express_note(one)
            + _server_note(one)
        )
    cap = out["capacity"]
    ratios = sorted(cap["pair_ratios"])
    lines.append(
        f"  capacity at {cap['pair_level']} in flight, pairs new/old "
        + " ".join(f"{r:.2f}" for r in cap["pair_ratios"])
        + f" (median {_median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
        + "; ".join(
            f"{name}: {cap[name]['batches']:.0f} batches of {cap[name]['batch_tokens']:.0f} tokens (mean), "
            f"{cap[name]['express']:.0f} express, {cap[name]['parks']:.0f} parks, "
            f"teacher CPU {cap[name]['cpu_ms_per_request']:.2f} ms/request, {cap[name]['core_share']:.0%} of its core"
            for name in ("new", "old")
        )
    )
    lines.append(
        "  shares (b) "
        + " ".join(f"{v:.1%}" for v in share_rows(out["new"], "share").values())
        + ", (c) 2:1:1:1 "
        + " ".join(f"{v:.1%}" for v in share_rows(out["new"], "weighted").values())
        + f"; C new/old {out['new']['capacity'] / out['old']['capacity']:.2f}"
    )
    return "\n".join(lines)


def _flood_table(args: argparse.Namespace, runs: list[dict]) -> list[str]:
    per = {s: [flood_rows(args, r[s]) for r in runs] for s in ("new", "old")}
    med = {s: {n: {k: _median([rows[n][k] for rows in per[s]]) for k in per[s][0][n]} for n in TENANTS} for s in per}
    lines = [
        f"(a) flood: student-a/b/c at R, student-d at {args.flood_factor:g}R, {args.phase_s:g} s "
        "(target for a/b/c: answered/R >= 0.8 and p50/solo <= 2 with the new scheduler)",
        f"{'client':<11}{'new /R':>8}{'p50 ms':>9}{'/solo':>8}{'refused':>9}{'hint s':>8}"
        f"{'old /R':>9}{'p50 ms':>9}{'/solo':>8}{'refused':>9}  verdict (new)",
    ]
    for n in TENANTS:
        a, b = med["new"][n], med["old"][n]
        if n == TENANTS[-1]:
            ok = all(rows[n]["exhausted"] > 0 for rows in per["new"])
        else:
            ok = a["per_rate"] >= 0.8 and a["per_solo"] <= 2.0 and a["other"] == 0
        lines.append(
            f"{n:<11}{a['per_rate']:>8.2f}{a['p50_ms']:>9.1f}{a['per_solo']:>8.2f}{a['exhausted']:>9.0f}"
            f"{a['hint_s']:>8.3f}{b['per_rate']:>9.2f}{b['p50_ms']:>9.1f}{b['per_solo']:>8.2f}"
            f"{b['exhausted']:>9.0f}  {_verdict(ok)}"
        )
    if not any(r["new"]["flood"][3].codes["RESOURCE_EXHAUSTED"] for r in runs):
        lines.append("the flooder was never refused (the flood stayed within what the teacher could queue)")
    return lines


def _share_table(runs: list[dict], phase: str, weights: Sequence[float]) -> list[str]:
    target = [w / sum(weights) for w in weights]
    med = {n: _median([share_rows(r["new"], phase)[n] for r in runs]) for n in TENANTS}
    lengths = runs[0]["new"]["share_lengths"]
    lines = [f"{'client':<11}{'seq len':>9}{'weight':>8}{'share':>8}{'target':>8}  verdict"]
    for n, length, w, t in zip(TENANTS, lengths, weights, target, strict=True):
        lines.append(f"{n:<11}{length:>9d}{w:>8g}{med[n]:>8.1%}{t:>8.0%}  {_verdict(abs(med[n] - t) <= 0.05)}")
    return lines


def format_summary(args: argparse.Namespace, runs: list[dict]) -> str:
    """The medians over the runs: capacity new vs old, the flood table, the saturation and weighted shares."""
    c_new = _median([r["new"]["capacity"] for r in runs])
    c_old = _median([r["old"]["capacity"] for r in runs])
    ratio = _median([_median(r["capacity"]["pair_ratios"]) for r in runs])
    pairs = sorted(x for r in runs for x in r["capacity"]["pair_ratios"])
    cpu = {s: _median([r["capacity"][s]["cpu_ms_per_request"] for r in runs]) for s in ("new", "old")}
    loads = ", ".join(f"{r['load_average']:.1f}" for r in runs)
    lines = [
        "",
        f"median of {len(runs)} run(s) (load average at each run's start: {loads}); "
        f"{args.seq_len}-token requests, top-k {args.top_k}, {args.backend} backend",
        f"capacity C: new scheduler {c_new:.1f} req/s, today's behaviour (--no-scheduler-express-lane) "
        f"{c_old:.1f} req/s; new/old of adjacent windows {ratio:.2f} (median of the runs' median pair ratios; "
        f"all {len(pairs)} pairs {pairs[0]:.2f}-{pairs[-1]:.2f}, quartiles "
        f"{pairs[len(pairs) // 4]:.2f}-{pairs[(3 * len(pairs)) // 4]:.2f}) (target >= 0.90)  {_verdict(ratio >= 0.9)}",
        f"teacher CPU per answered request at that level: new {cpu['new']:.2f} ms, old {cpu['old']:.2f} ms "
        f"(old/new {cpu['old'] / cpu['new']:.2f}: the work per request, whatever share of the core other jobs took)",
        "",
        *_flood_table(args, runs),
        "",
        f"(b) saturation: all four backlogged ({args.outstanding} in flight each), {args.phase_s:g} s window, "
        "shares of the scored tokens (teacher /metrics)",
        *_share_table(runs, "share", (1.0,) * 4),
        "",
        "(c) weighted: the same after the tokens file was rewritten with weights 2:1:1:1 (no restart)",
        *_share_table(runs, "weighted", WEIGHTS),
    ]
    return "\n".join(lines)


def _open_tenants(args: argparse.Namespace, teacher: PinnedTeacher, tokens: dict[str, str], vocab: int) -> list[Tenant]:
    return [Tenant(teacher.address, n, tokens[n], args.seq_len, args.top_k, vocab) for n in TENANTS]


async def _capacity(args: argparse.Namespace, teachers: dict[str, PinnedTeacher], tenants: dict[str, list[Tenant]]):
    """Step 0 on both teachers, interleaved: per in-flight level, `--capacity-windows` windows per teacher of
    capacity_s / windows each, in the order A B B A A B B A ... (A: the run's first teacher), so that machine
    load that drifts hits both alike; the i-th windows of the two teachers are adjacent (a pair: A B or B A).
    Returns {in_flight: {name: [metrics delta of each window, in order]}}."""
    first, second = list(teachers)
    order = ([first, second, second, first] * args.capacity_windows)[: 2 * args.capacity_windows]
    levels: dict[int, dict[str, list[dict]]] = {}
    for in_flight in CAPACITY_IN_FLIGHT:  # spread over the four channels, as the load of (a) is
        levels[in_flight] = {name: [] for name in teachers}
        for name in order:
            delta, _ = await _saturated(
                tenants[name],
                [in_flight // 4] * 4,
                args.capacity_s / args.capacity_windows,
                args,
                teachers[name].ops_url,
                warmup_s=CAPACITY_WARMUP_S,
                cpu_s=teachers[name].cpu_s,
            )
            levels[in_flight][name].append(delta)
    return levels


def _answered_in(delta: dict) -> float:
    return sum(delta["requests"].get(t, {}).get(("Score", "OK"), 0.0) for t in TENANTS)


def capacity_figures(levels: dict[int, dict[str, list[dict]]]) -> dict:
    """From `_capacity`'s windows: each teacher's C (the best over the levels of the median window's answered
    requests/s, `completion_rate`) and level; the
    level where the two together answered the most, and there each pair's ratio new/old (requests/s), and per
    teacher the counts that explain a gap: engine batches, mean tokens per batch, express dispatches, bulk parks,
    the teacher's CPU milliseconds per answered request and the share of its core it got (CPU s / wall s)."""
    rate = {level: {n: _median([w["rate"] for w in ws]) for n, ws in by.items()} for level, by in levels.items()}
    out: dict = {"pair_level": max(rate, key=lambda level: sum(rate[level].values()))}
    for name in ("new", "old"):
        best = max(rate, key=lambda level, name=name: rate[level][name])
        out[name] = {"capacity": rate[best][name], "capacity_at": best}
    by = levels[out["pair_level"]]
    out["pair_ratios"] = [a["rate"] / b["rate"] for a, b in zip(by["new"], by["old"], strict=True)]
    for name, ws in by.items():
        answered, batches = sum(map(_answered_in, ws)), sum(w["batches"] for w in ws)
        cpu, wall = sum(w.get("cpu_s", 0.0) for w in ws), sum(w["window_s"] for w in ws)
        out[name] |= {
            "batches": batches,
            "batch_tokens": sum(w["batch_tokens"] for w in ws) / max(batches, 1.0),
            "express": sum(sum(w["express"].values()) for w in ws),
            "parks": sum(w["bulk_yields"] for w in ws),
            "cpu_ms_per_request": 1000 * cpu / max(answered, 1.0),
            "core_share": cpu / wall,
        }
    return out


async def _open_loops(
    args: argparse.Namespace, tenants: list[Tenant], rates: list[float], offsets: list[float], pool: Executor | None
) -> list[Tally]:
    """`tenants[i]` at `rates[i]` from `offsets[i]` s on, for `--phase-s`: on this event loop, or (`pool`) each in a
    worker process of its own on its own channel, all starting together a moment from now."""
    if pool is None:
        plan = zip(tenants, rates, offsets, strict=True)
        return list(await asyncio.gather(*(t.open_loop(r, args.phase_s, args.timeout_s, o) for t, r, o in plan)))
    start_at = time.monotonic() + 2.0  # each worker connects first
    futures = [
        asyncio.wrap_future(pool.submit(open_loop_process, t.spec, r, args.phase_s, args.timeout_s, start_at + o))
        for t, r, o in zip(tenants, rates, offsets, strict=True)
    ]
    return list(await asyncio.gather(*futures))


async def _solo_flood(
    args: argparse.Namespace, teacher: PinnedTeacher, tenants: list[Tenant], rate: float, pool: Executor | None
) -> dict:
    """Steps 1-2 on one teacher: solo p50 at `rate`, then the flood table (with the teacher's own Score latency
    per student, to tell the teacher's part from the load generator's)."""
    before = await asyncio.to_thread(read_client_metrics, teacher.ops_url)
    out: dict = {"rate": rate, "solo": (await _open_loops(args, tenants[:1], [rate], [0.0], pool))[0]}
    between = await asyncio.to_thread(read_client_metrics, teacher.ops_url)
    out["solo_metrics"] = metrics_delta(before, between)
    rates = [rate] * 3 + [args.flood_factor * rate]
    offsets = [i / (4 * rate) for i in range(4)]  # spread over one period: no lockstep arrivals
    out["flood"] = await _open_loops(args, tenants, rates, offsets, pool)
    out["flood_metrics"] = metrics_delta(between, await asyncio.to_thread(read_client_metrics, teacher.ops_url))
    return out


async def _capacity_solo_flood(
    args: argparse.Namespace, teachers: dict[str, PinnedTeacher], tokens: dict[str, str], pool: Executor | None
) -> dict[str, dict]:
    """Steps 0-2 on both teachers (both running, the idle one waiting): capacity interleaved, then solo and
    flood on each in turn, each at its own R = load x C / 3."""
    vocab = await _vocab_size(teachers["new"].address, tokens[TENANTS[0]])
    tenants = {name: _open_tenants(args, t, tokens, vocab) for name, t in teachers.items()}
    out: dict[str, dict] = {}
    try:
        for group in tenants.values():
            for t in group:  # warm-up: connections, first forward passes
                await t.open_loop(20.0, 0.25, args.timeout_s)
        figures = capacity_figures(await _capacity(args, teachers, tenants))
        out["capacity"] = figures
        for name in teachers:
            out[name] = dict(figures[name])
        for name, teacher in teachers.items():
            rate = args.load * out[name]["capacity"] / 3
            out[name] |= await _solo_flood(args, teacher, tenants[name], rate, pool)
    finally:
        for group in tenants.values():
            for t in group:
                await t.close()
    return out


async def _shares(args: argparse.Namespace, teacher: PinnedTeacher, tokens: dict[str, str]) -> dict:
    """(b) saturation shares, then (c) the same with weights 2:1:1:1 written into the running teacher's file."""
    vocab = await _vocab_size(teacher.address, tokens[TENANTS[0]])
    lengths = [max(4, int(f * args.seq_len)) for f in SHARE_LENGTHS]
    out: dict = {"share_lengths": lengths, "share_outstanding": [args.outstanding] * 4}
    for phase in ("share", "weighted"):
        if phase == "weighted":
            teacher.write_tokens(tokens, dict(zip(TENANTS, WEIGHTS, strict=True)))
        tenants = [
            Tenant(teacher.address, n, tokens[n], k, args.top_k, vocab) for n, k in zip(TENANTS, lengths, strict=True)
        ]
        try:
            weights: dict[str, float] | None = dict(zip(TENANTS, WEIGHTS, strict=True)) if phase == "weighted" else None
            out[f"{phase}_metrics"], _ = await _saturated(
                tenants, out["share_outstanding"], args.phase_s, args, teacher.ops_url, weights
            )
        finally:
            for t in tenants:
                await t.close()
    return out


def _one_run(
    args: argparse.Namespace, model_dir: str, tokens: dict[str, str], tmp: Path, run: int, pool: Executor | None
) -> dict:
    """Both teachers at once (each phase loads one; the order alternates between runs); the shares on the new one."""
    out: dict = {"load_average": os.getloadavg()[0]}
    order = ("new", "old") if run % 2 == 0 else ("old", "new")
    teachers: dict[str, PinnedTeacher] = {}
    try:
        for name in order:
            extra = SCHEDULERS[name] + (args.new_teacher_arg if name == "new" else [])
            teachers[name] = PinnedTeacher(args, model_dir, tmp / f"tokens-{name}.yaml", extra)
            teachers[name].write_tokens(tokens)
        for name, teacher in teachers.items():
            teacher.wait_ready()
            print(f"run {run + 1}, {name} scheduler: {' '.join(teacher.command[2:])} (core {args.core}, 1 thread)")
        out |= asyncio.run(_capacity_solo_flood(args, teachers, tokens, pool))
        out["new"] |= asyncio.run(_shares(args, teachers["new"], tokens))
    finally:
        for teacher in teachers.values():
            teacher.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    tokens = {name: secrets.token_hex(16) for name in TENANTS}
    model_dir = _model_dir(args.model)
    others = os.sched_getaffinity(0) - {args.core}
    if others:  # the load generator never competes with the teacher for its core
        os.sched_setaffinity(0, others)
    runs = []
    pool = None
    if args.students_in == "processes":  # spawned (not forked: this process runs gRPC), on the cores above
        pool = ProcessPoolExecutor(len(TENANTS), mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(abs, range(4 * len(TENANTS))))  # start the workers before anything is timed
    try:
        with tempfile.TemporaryDirectory(prefix="opd-bench-tenants-") as tmp:
            for run in range(args.runs):
                runs.append(_one_run(args, model_dir, tokens, Path(tmp), run, pool))
                print(format_run(args, runs[-1], run), flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    print(format_summary(args, runs))
    return 0


__all__ = ["Tally", "format_run", "format_summary", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
