"""`opd bench tenants`: four students sharing one teacher pinned to one core — a flood, then saturation.

The teacher (`hf` backend) runs as its own process pinned to one CPU core
(`sched_setaffinity` + one torch/OpenMP thread), with a tokens file naming
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
Not a test: the numbers go to BENCHMARKS.md with the command. `--quick` runs
every phase for a few seconds on the tiny random model (the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from opd.processes import free_port, stop_process
from opd_apps.bench.tenant_load import Tally, Tenant, metrics_delta, read_client_metrics

FULL = {"model": "tiny", "seq_len": 128, "phase_s": 30.0, "capacity_s": 10.0}
QUICK = {"model": "tiny", "seq_len": 64, "phase_s": 5.0, "capacity_s": 2.0}
TENANTS = ("student-a", "student-b", "student-c", "student-d")  # student-d floods in (a)
SHARE_LENGTHS = (0.5, 1.0, 1.5, 2.0)
CAPACITY_IN_FLIGHT = (
    8,
    32,
    128,
)  # requests kept in flight while capacity is measured  # (b): each student's sequence length, in units of --seq-len


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench tenants", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="HF model directory, `embedded` or `tiny` (a random tiny model; the default)")
    p.add_argument("--seq-len", type=int, help="tokens per request in the capacity, solo and flood phases (128)")
    p.add_argument("--phase-s", type=float, help="seconds of the solo, flood and saturation phases (30)")
    p.add_argument("--capacity-s", type=float, help="seconds of each capacity measurement (10)")
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
        "--max-queued-requests",
        type=int,
        default=384,
        help="the teacher's queue bound (scheduler.max_queued_requests); small so the flood reaches it in seconds",
    )
    p.add_argument("--quick", action="store_true", help="smoke-run sizes: tiny model, 64 tokens, 5 s phases")
    args = p.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.seq_len < 4:
        p.error(f"--seq-len must be at least 4 (got {args.seq_len})")
    if not 0 < args.load < 1:
        p.error(f"--load is a share of capacity in (0, 1) (got {args.load})")
    if args.phase_s <= 0 or args.capacity_s <= 0 or args.flood_factor <= 1 or args.outstanding < 1:
        p.error("--phase-s and --capacity-s must be > 0, --flood-factor > 1 and --outstanding >= 1")
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
    """`opd teacher --backend hf` as a child process on one core, one thread, auth on."""

    def __init__(self, args: argparse.Namespace, model_dir: str, tokens_file: Path) -> None:
        self.grpc_port, self.ops_port = free_port(), free_port()
        max_len = int(max(SHARE_LENGTHS) * args.seq_len) + 8
        cmd = [sys.executable, "-m", "opd", "teacher", "--model", model_dir, "--backend", "hf"]
        cmd += ["--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--log-level", "WARNING"]
        cmd += ["--ops-host", "127.0.0.1", "--ops-port", str(self.ops_port), "--auth-tokens-file", str(tokens_file)]
        cmd += ["--engine-max-model-len", str(max_len), "--engine-max-top-k", str(max(args.top_k, 1))]
        cmd += ["--scheduler-max-queued-requests", str(args.max_queued_requests), *args.teacher_arg]
        self.command = cmd
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        core = args.core
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **threads}, preexec_fn=lambda: os.sched_setaffinity(0, {core})
        )
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
    tenants: list[Tenant], outstanding: list[int], window_s: float, args: argparse.Namespace, ops_url: str
):
    """`tenants` keep `outstanding` requests in flight; per-client metrics over a `window_s` window after a
    warm-up second. Returns (metrics delta, tallies)."""
    stop = asyncio.Event()
    runs = [asyncio.create_task(t.saturate(n, stop, args.timeout_s)) for t, n in zip(tenants, outstanding, strict=True)]
    await asyncio.sleep(1.0)
    before = await asyncio.to_thread(read_client_metrics, ops_url)
    await asyncio.sleep(window_s)
    after = await asyncio.to_thread(read_client_metrics, ops_url)
    stop.set()
    tallies = await asyncio.gather(*runs)
    return metrics_delta(before, after), tallies


async def _run(args: argparse.Namespace, teacher: PinnedTeacher, tokens: dict[str, str]) -> dict:
    vocab = await _vocab_size(teacher.address, tokens[TENANTS[0]])
    make = lambda name, length: Tenant(teacher.address, name, tokens[name], length, args.top_k, vocab)  # noqa: E731
    tenants = [make(name, args.seq_len) for name in TENANTS]
    out: dict = {}
    try:
        for t in tenants:  # warm-up: connections, first forward passes
            await t.open_loop(20.0, 0.25, args.timeout_s)
        out["capacity"], out["capacity_at"] = 0.0, 0
        for in_flight in CAPACITY_IN_FLIGHT:  # spread over the four channels, as the load of (a) is
            delta, _ = await _saturated(tenants, [in_flight // 4] * 4, args.capacity_s, args, teacher.ops_url)
            answered = sum(delta["requests"].get(t, {}).get(("Score", "OK"), 0.0) for t in TENANTS) / args.capacity_s
            if answered > out["capacity"]:
                out["capacity"], out["capacity_at"] = answered, in_flight
        rate = args.load * out["capacity"] / 3
        out["rate"] = rate
        out["solo"] = await tenants[0].open_loop(rate, args.phase_s, args.timeout_s)
        before = await asyncio.to_thread(read_client_metrics, teacher.ops_url)
        rates = [rate] * 3 + [args.flood_factor * rate]
        offsets = [i / (4 * rate) for i in range(4)]  # spread over one period: no lockstep arrivals
        out["flood"] = await asyncio.gather(
            *(t.open_loop(r, args.phase_s, args.timeout_s, o) for t, r, o in zip(tenants, rates, offsets, strict=True))
        )
        out["flood_metrics"] = metrics_delta(before, await asyncio.to_thread(read_client_metrics, teacher.ops_url))
    finally:
        for t in tenants:
            await t.close()
    lengths = [max(4, int(f * args.seq_len)) for f in SHARE_LENGTHS]
    tenants = [make(name, n) for name, n in zip(TENANTS, lengths, strict=True)]
    outstanding = [args.outstanding] * len(lengths)
    out["share_outstanding"] = outstanding
    try:
        out["share_metrics"], _ = await _saturated(tenants, outstanding, args.phase_s, args, teacher.ops_url)
    finally:
        for t in tenants:
            await t.close()
    out["share_lengths"] = lengths
    return out


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def format_report(args: argparse.Namespace, out: dict) -> str:
    rate, solo = out["rate"], out["solo"]
    lines = [
        f"capacity: {out['capacity']:.1f} requests/s of {args.seq_len} tokens (top-k {args.top_k}), "
        f"best of {', '.join(map(str, CAPACITY_IN_FLIGHT))} in flight over the four channels "
        f"(at {out['capacity_at']})",
        f"R = {rate:.2f} requests/s per well-behaved student (3R = {args.load:.0%} of capacity); "
        f"solo p50 {solo.p50_ms():.1f} ms at R ({solo.ok}/{sum(solo.codes.values())} answered)",
        "",
        f"(a) flood: student-a/b/c at R, student-d at {args.flood_factor:g}R, {args.phase_s:g} s "
        "(expected: answered >= 0.8 R, p50 <= 2x solo, flooder RESOURCE_EXHAUSTED)",
        f"{'client':<11}{'sent/s':>9}{'answered/s':>12}{'/R':>7}{'p50 ms':>9}{'/solo':>7}"
        f"{'RESOURCE_EXHAUSTED':>20}{'other errors':>14}{'hint p50 s':>12}  verdict",
    ]
    for name, tally in zip(TENANTS, out["flood"], strict=True):
        sent = sum(tally.codes.values()) / args.phase_s
        answered = tally.ok / args.phase_s
        p50_ratio = tally.p50_ms() / solo.p50_ms()
        exhausted = tally.codes["RESOURCE_EXHAUSTED"]
        hint = sorted(tally.retry_hints_s)[len(tally.retry_hints_s) // 2] if tally.retry_hints_s else float("nan")
        if name == TENANTS[-1]:
            verdict = _verdict(exhausted > 0 and len(tally.retry_hints_s) == exhausted)
        else:
            verdict = _verdict(answered >= 0.8 * rate and p50_ratio <= 2.0 and tally.errors == 0)
        lines.append(
            f"{name:<11}{sent:>9.2f}{answered:>12.2f}{answered / rate:>7.2f}{tally.p50_ms():>9.1f}{p50_ratio:>7.2f}"
            f"{exhausted:>20d}{tally.errors - exhausted:>14d}{hint:>12.3f}  {verdict}"
        )
    if not any(t.codes["RESOURCE_EXHAUSTED"] for t in out["flood"]):
        lines.append(
            "the flood stayed within what the teacher could queue (nobody was refused): (a) does not test "
            "isolation on this run; raise --load or --flood-factor, or run on a quieter machine"
        )
    lines.append("teacher /metrics, requests by client and code during (a):")
    for name in TENANTS:
        counts = out["flood_metrics"]["requests"].get(name, {})
        text = ", ".join(f"{code} {n:.0f}" for (rpc, code), n in sorted(counts.items()) if rpc == "Score" and n)
        lines.append(f"  {name}: {text or 'none'}")
    scored = out["share_metrics"]["scored"]
    total = sum(scored.get(name, 0.0) for name in TENANTS)
    lines += [
        "",
        f"(b) saturation: all four backlogged, {args.phase_s:g} s window (expected: 25% +/- 5% of scored tokens each)",
        f"{'client':<11}{'seq len':>9}{'in flight':>11}{'answered':>10}{'errors':>8}{'scored tokens':>15}{'share':>8}"
        f"{'/25%':>7}  verdict",
    ]
    for name, length, in_flight in zip(TENANTS, out["share_lengths"], out["share_outstanding"], strict=True):
        tokens = scored.get(name, 0.0)
        share = tokens / total if total else float("nan")
        codes = out["share_metrics"]["requests"].get(name, {})
        answered = codes.get(("Score", "OK"), 0.0)
        errors = sum(n for (_, code), n in codes.items() if code != "OK")
        lines.append(
            f"{name:<11}{length:>9d}{in_flight:>11d}{answered:>10.0f}{errors:>8.0f}{tokens:>15.0f}{share:>8.1%}"
            f"{share / 0.25:>7.2f}  {_verdict(abs(share - 0.25) <= 0.05)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    tokens = {name: secrets.token_hex(16) for name in TENANTS}
    with tempfile.TemporaryDirectory(prefix="opd-bench-tenants-") as tmp:
        tokens_file = Path(tmp) / "tokens.yaml"
        tokens_file.write_text("".join(f"{name}: {token}\n" for name, token in tokens.items()))
        teacher = PinnedTeacher(args, _model_dir(args.model), tokens_file)
        try:
            others = os.sched_getaffinity(0) - {args.core}
            if others:  # the load generator never competes with the teacher for its core
                os.sched_setaffinity(0, others)
            teacher.wait_ready()
            print(f"teacher: {' '.join(teacher.command[2:])} (pinned to core {args.core}, 1 thread)")
            out = asyncio.run(_run(args, teacher, tokens))
        finally:
            teacher.stop()
    print(format_report(args, out))
    return 0


__all__ = ["Tally", "format_report", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
