"""`opd bench queue`: rollout records through the Redis Streams transport vs raw XADD / XREADGROUP.

Measures records/s and MB/s for realistic rollout records (a 512-token prompt
and 1k- or 8k-token responses: int32 ids, uint8 mask, float32 log-probs) in
two phases — produce (encode + `StreamProducer.send_many`, which includes the
backpressure check and MULTI) and consume (`StreamConsumer.read` with decode,
dedupe, then `ack`, which also deletes) — against the same payload bytes sent
with a plain pipelined XADD and read with XREADGROUP + XACK, in the same run
on the same server. The ratio (opd / raw) is the transport's overhead.

By default a private `redis-server` (`opd.redis_server`) is started on a free
port so other traffic does not skew the numbers; `--redis-url` measures an
existing server. `--quick` is the smoke-test size (short records, one run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from opd.redis_server import redis_server
from opd.stream_consumer import StreamConsumer
from opd.streams import RedisConfig, StreamKeys, StreamProducer, connect
from protos.records import RolloutRecord

PROMPT_TOKENS = 512
FULL = {"sizes": [1024, 8192], "records": 5000, "batch": 64, "repeats": 5}
QUICK = {"sizes": [256, 1024], "records": 200, "batch": 32, "repeats": 1}


@dataclass
class Result:
    tokens: int
    path: str  # "opd" or "raw"
    phase: str  # "produce" or "consume"
    records_per_s: float
    mb_per_s: float


def make_record(index: int, num_tokens: int, rng: np.random.Generator) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=f"bench/{index}",
        prompt_id=f"p{index // 8}",
        group_id=f"g{index // 8}",
        group_size=8,
        split="train",
        prompt_ids=rng.integers(0, 150_000, PROMPT_TOKENS).astype(np.int32),
        response_ids=rng.integers(0, 150_000, num_tokens).astype(np.int32),
        response_mask=np.ones(num_tokens, np.uint8),
        behaviour_logprobs=-rng.random(num_tokens).astype(np.float32),
        reward=1.0,
        policy_version=12,
        meta={"worker": "bench-0", "turns": 1, "temperature": 1.0},
    )


async def _opd_round(redis, records: list[RolloutRecord], batch: int, ns: str) -> tuple[float, float]:
    keys = StreamKeys(ns)
    producer = StreamProducer(redis, keys.rollouts, "trainer", max_pending=len(records) + batch)
    consumer = StreamConsumer(
        redis,
        keys.rollouts,
        "trainer",
        "bench",
        decode=RolloutRecord.decode,
        dead_stream=keys.dead,
        key_of=lambda r: r.rollout_id,
    )
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        await producer.send_many([r.encode() for r in records[i : i + batch]])
    produce_s = time.perf_counter() - start
    start, got = time.perf_counter(), 0
    while got < len(records):
        entries = await consumer.read(batch, block_ms=1000)
        await consumer.ack([e.entry_id for e in entries])
        got += len(entries)
    return produce_s, time.perf_counter() - start


async def _raw_round(redis, payloads: list[bytes], batch: int, ns: str) -> tuple[float, float]:
    stream = f"{ns}:raw"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        async with redis.pipeline(transaction=False) as pipe:
            for payload in payloads[i : i + batch]:
                pipe.xadd(stream, {b"d": payload})
            await pipe.execute()
    produce_s = time.perf_counter() - start
    start, got = time.perf_counter(), 0
    while got < len(payloads):
        reply = await redis.xreadgroup("g", "c", {stream: ">"}, count=batch, block=1000)
        ids = [eid for eid, _ in reply[0][1]]
        await redis.xack(stream, "g", *ids)
        got += len(ids)
    return produce_s, time.perf_counter() - start


async def bench_size(url: str, num_tokens: int, count: int, batch: int, repeats: int) -> list[Result]:
    rng = np.random.default_rng(num_tokens)
    records = [make_record(i, num_tokens, rng) for i in range(count)]
    payloads = [r.encode() for r in records]
    mb = sum(len(p) for p in payloads) / 1e6
    redis = connect(RedisConfig(url=url))
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(repeats):  # interleaved, so both paths see the same server state
            for path in ("raw", "opd"):
                ns = f"opd-bench-{uuid.uuid4().hex[:8]}"
                if path == "raw":
                    produce_s, consume_s = await _raw_round(redis, payloads, batch, ns)
                else:
                    produce_s, consume_s = await _opd_round(redis, records, batch, ns)
                times.setdefault((path, "produce"), []).append(produce_s)
                times.setdefault((path, "consume"), []).append(consume_s)
                await redis.delete(f"{ns}:raw", f"{ns}:rollouts", f"{ns}:dead")
    finally:
        await redis.aclose()
    return [
        Result(num_tokens, path, phase, count / statistics.median(ts), mb / statistics.median(ts))
        for (path, phase), ts in sorted(times.items())
    ]


def format_table(results: Sequence[Result], record_bytes: dict[int, int]) -> str:
    by = {(r.tokens, r.path, r.phase): r for r in results}
    lines = [
        "| response tokens | record KB | phase | opd records/s | opd MB/s | raw records/s | raw MB/s | opd / raw |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokens in sorted(record_bytes):
        for phase in ("produce", "consume"):
            o, r = by[(tokens, "opd", phase)], by[(tokens, "raw", phase)]
            lines.append(
                f"| {tokens} | {record_bytes[tokens] / 1024:.1f} | {phase} | {o.records_per_s:,.0f} | "
                f"{o.mb_per_s:,.1f} | {r.records_per_s:,.0f} | {r.mb_per_s:,.1f} | "
                f"{o.records_per_s / r.records_per_s:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd bench queue", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--redis-url", default=None, help="server to measure (default: a private redis-server)")
    parser.add_argument("--sizes", type=int, nargs="+", help="response lengths in tokens (default 1024 8192)")
    parser.add_argument(
        "--records",
        type=int,
        help="records per 1k-token run (default 5000; scaled for other "
        "lengths so each run moves a similar number of bytes)",
    )
    parser.add_argument("--batch", type=int, help="records per XADD pipeline / read (default 64)")
    parser.add_argument("--repeats", type=int, help="runs per path; the median is reported (default 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-run defaults: sizes 256 1024, 200 records, batch 32, one run per path (explicit flags still win)",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("records", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if min(args.sizes) < 1:
        parser.error(f"--sizes must be positive token counts (got {args.sizes})")
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(redis_server())
        results, record_bytes = [], {}
        for tokens in args.sizes:
            count = max(args.batch, args.records * 1024 // tokens)
            record_bytes[tokens] = len(make_record(0, tokens, np.random.default_rng(0)).encode())
            results += asyncio.run(bench_size(url, tokens, count, args.batch, args.repeats))
            print(f"measured {tokens}-token records ({count} x {args.repeats} runs per path)", file=sys.stderr)
    print(format_table(results, record_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
