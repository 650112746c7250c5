"""Load generators for the multi-tenant benchmark: one student = one channel, open-loop or saturating.

Owns how a tenant sends `Score` requests (a fixed rate whatever the replies,
or a fixed number always outstanding), what is recorded per request (status
code, latency, the server's `retry-after-s` hint) and reading the teacher's
per-client counters (scored tokens, requests by code, express-lane requests,
weights) from its ops `/metrics`. Raw gRPC stubs, no retries: every
status the teacher answers is counted as it was answered. Does not start the
teacher or decide what the numbers mean (`bench_tenants.py` does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack


@dataclass
class Tally:
    """What one tenant saw: status codes, latencies of answered requests (s), retry hints of rejections (s)."""

    codes: Counter[str] = field(default_factory=Counter)
    ok_latency_s: list[float] = field(default_factory=list)
    retry_hints_s: list[float] = field(default_factory=list)
    ok_positions: int = 0
    ok_at_s: list[float] = field(default_factory=list)  # time.monotonic() of each answer

    @property
    def ok(self) -> int:
        return self.codes["OK"]

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK")

    def p50_ms(self) -> float:
        return float(np.median(self.ok_latency_s) * 1000) if self.ok_latency_s else float("nan")


def completion_rate(times_s: list[float]) -> float:
    """Answers per second from their completion times: the least-squares slope of the running count against
    time. A batching server answers in lumps (a batch's requests at once); a count over a fixed window is off by
    up to one lump (64 requests in a window of 2-4 batches: +/-30%), while the slope of the staircase is the lump
    size over the lump spacing whatever the window's phase. nan with fewer than two distinct times."""
    t_N = np.sort(np.asarray(times_s, dtype=np.float64))
    if len(t_N) < 2 or t_N[-1] <= t_N[0]:
        return float("nan")
    return float(np.polyfit(t_N - t_N[0], np.arange(1, len(t_N) + 1), 1)[0])


@dataclass(frozen=True)
class TenantSpec:
    """What a `Tenant` is built from, so that another process can build it (picklable)."""

    address: str
    name: str
    token: str
    seq_len: int
    top_k: int
    vocab_size: int


class Tenant:
    """One student: its own channel (own connection) and bearer token; sends one fixed sequence."""

    def __init__(self, address: str, name: str, token: str, seq_len: int, top_k: int, vocab_size: int) -> None:
        self.name = name
        self.spec = TenantSpec(address, name, token, seq_len, top_k, vocab_size)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.TeacherStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        ids = np.random.default_rng(zlib.crc32(name.encode())).integers(0, vocab_size, seq_len).astype(np.int32)
        self.request = pb.ScoreRequest(token_ids=pack(ids, pb.INT32), score_from=1, top_k=top_k)
        self.positions = seq_len - 1

    async def close(self) -> None:
        await self._channel.close()

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Open the connection now, so that the first timed request does not pay for it."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def _one(self, tally: Tally, timeout_s: float) -> None:
        started = time.perf_counter()
        try:
            await self._stub.Score(self.request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            tally.codes[err.code().name] += 1
            hint = [float(v) for k, v in (err.trailing_metadata() or ()) if k == "retry-after-s"]
            tally.retry_hints_s += hint
            return
        tally.codes["OK"] += 1
        tally.ok_at_s.append(time.monotonic())
        tally.ok_latency_s.append(time.perf_counter() - started)
        tally.ok_positions += self.positions

    async def open_loop(self, rate_per_s: float, duration_s: float, timeout_s: float, offset_s: float = 0.0) -> Tally:
        """Send at `rate_per_s` for `duration_s` whatever the replies (request i at offset + i / rate); wait
        for all. Different offsets keep students at one rate from arriving in lockstep."""
        tally, tasks = Tally(), []
        loop = asyncio.get_running_loop()
        start = loop.time() + offset_s
        for i in range(max(1, round(rate_per_s * duration_s))):
            delay = start + i / rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._one(tally, timeout_s)))
        await asyncio.gather(*tasks)
        return tally

    async def saturate(self, outstanding: int, stop: asyncio.Event, timeout_s: float) -> Tally:
        """Keep `outstanding` requests in flight until `stop` is set."""
        tally = Tally()

        async def worker() -> None:
            while not stop.is_set():
                await self._one(tally, timeout_s)

        await asyncio.gather(*(worker() for _ in range(outstanding)))
        return tally


def open_loop_process(
    spec: TenantSpec, rate_per_s: float, duration_s: float, timeout_s: float, start_at: float
) -> Tally:
    """`Tenant.open_loop` in this (worker) process, on its own event loop and channel, its first request at
    `start_at` (`time.monotonic()`, the same clock in every process). Run in a separate process per student,
    as separate teams would be: a light student's replies then never wait in one event loop behind another
    student's."""

    async def run() -> Tally:
        tenant = Tenant(**dataclasses.asdict(spec))
        try:
            await tenant.connect()
            return await tenant.open_loop(rate_per_s, duration_s, timeout_s, offset_s=start_at - time.monotonic())
        finally:
            await tenant.close()

    return asyncio.run(run())


def read_client_metrics(ops_url: str) -> dict[str, Any]:
    """Teacher counters from `/metrics`: per client scored positions, requests by (rpc, code), express-lane
    requests and weight; the times bulk batches parked for express ones (`bulk_yields`); engine batches run
    (`batches`, express ones included) and the tokens in them (`batch_tokens`); per client the teacher's own
    Score latency histogram (`score_le`: cumulative count per bucket bound, s)."""
    text = httpx.get(f"{ops_url}/metrics", timeout=30).text
    scored: dict[str, float] = defaultdict(float)
    requests: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    weights: dict[str, float] = {}
    express: dict[str, float] = defaultdict(float)
    score_le: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    yields = batches = batch_tokens = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "opd_teacher_bulk_yields_total":
                yields += sample.value
            elif sample.name == "opd_teacher_batch_size_tokens_count":
                batches += sample.value
            elif sample.name == "opd_teacher_batch_size_tokens_sum":
                batch_tokens += sample.value
            elif sample.name == "opd_teacher_scored_tokens_total":
                scored[sample.labels["client"]] += sample.value
            elif sample.name == "opd_teacher_client_weight":
                weights[sample.labels["client"]] = sample.value
            elif sample.name == "opd_teacher_express_requests_total":
                express[sample.labels["client"]] += sample.value
            elif sample.name == "opd_teacher_request_latency_seconds_bucket" and sample.labels["rpc"] == "Score":
                score_le[sample.labels["client"]][float(sample.labels["le"])] += sample.value
            elif sample.name == "opd_teacher_requests_total":
                labels = sample.labels
                requests[labels["client"]][(labels["rpc"], labels["code"])] += sample.value
    return {
        "scored": dict(scored),
        "requests": {c: dict(v) for c, v in requests.items()},
        "weights": weights,
        "express": dict(express),
        "score_le": {c: dict(v) for c, v in score_le.items()},
        "bulk_yields": yields,
        "batches": batches,
        "batch_tokens": batch_tokens,
    }


def histogram_p50_ms(cumulative: dict[float, float]) -> float:
    """The median of a Prometheus histogram's cumulative bucket counts ({upper bound s: count}), interpolated
    linearly inside its bucket as `histogram_quantile` does, in ms; nan when empty."""
    bounds = sorted(cumulative)
    total = cumulative.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    below, lower = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= total / 2:
            if bound == float("inf"):
                return lower * 1000
            return 1000 * (lower + (bound - lower) * (total / 2 - below) / max(count - below, 1e-9))
        below, lower = count, bound
    return float("nan")


def metrics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after - before` of two `read_client_metrics` snapshots."""
    scored = {c: v - before["scored"].get(c, 0.0) for c, v in after["scored"].items()}
    requests = {
        c: {k: v - before["requests"].get(c, {}).get(k, 0.0) for k, v in counts.items()}
        for c, counts in after["requests"].items()
    }
    express = {c: v - before.get("express", {}).get(c, 0.0) for c, v in after.get("express", {}).items()}
    score_le = {
        c: {le: n - before.get("score_le", {}).get(c, {}).get(le, 0.0) for le, n in counts.items()}
        for c, counts in after.get("score_le", {}).items()
    }
    return {
        "score_le": score_le,
        "scored": scored,
        "requests": requests,
        "weights": after.get("weights", {}),
        "express": express,
        **{k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("bulk_yields", "batches", "batch_tokens")},
    }
