"""Heartbeat reclaim against a real Redis: the entries of a consumer killed with SIGKILL are claimed once its
heartbeat expires, whatever their idle time; a live consumer keeps its entries however long it holds them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from opd.stream_consumer import StreamConsumer
from opd.stream_heartbeat import alive_key, registry_key
from opd.streams import PROMPT_GROUP, RedisConfig, StreamKeys, StreamProducer, connect
from protos.records import PromptRecord

pytestmark = pytest.mark.timeout(90)

TTL_MS = 1000
NEVER_IDLE_MS = 600_000  # the idle-time fallback cannot fire during these tests: only the heartbeat can

_HOLDER = textwrap.dedent("""
    import asyncio, sys, time
    from opd.stream_consumer import StreamConsumer
    from opd.streams import PROMPT_GROUP, RedisConfig, StreamKeys, connect
    from protos.records import PromptRecord

    async def main(url, ns, ttl_ms):
        redis, keys = connect(RedisConfig(url=url)), StreamKeys(ns)
        c = StreamConsumer(redis, keys.prompts, PROMPT_GROUP, "holder", decode=PromptRecord.decode,
                           dead_stream=keys.dead, claim_idle_ms=600_000, heartbeat_ttl_ms=ttl_ms)
        heartbeat = c.heartbeat()
        await heartbeat.beat()
        beat = asyncio.create_task(heartbeat.run(asyncio.Event()))
        held = await c.read(3, block_ms=1000)
        print(",".join(e.value.prompt_id for e in held), flush=True)
        await asyncio.sleep(600)  # alive but slow: holds its prompts, heartbeat running, until killed
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def _consumer(redis, keys: StreamKeys, name: str) -> StreamConsumer[PromptRecord]:
    return StreamConsumer(
        redis,
        keys.prompts,
        PROMPT_GROUP,
        name,
        decode=PromptRecord.decode,
        dead_stream=keys.dead,
        claim_idle_ms=NEVER_IDLE_MS,
        heartbeat_ttl_ms=TTL_MS,
    )


async def _feed(redis, keys: StreamKeys, n: int) -> list[str]:
    ids = [f"q{i}" for i in range(n)]
    records = [PromptRecord(pid, messages=[{"role": "user", "content": pid}]).encode() for pid in ids]
    await StreamProducer(redis, keys.prompts, PROMPT_GROUP).send_many(records)
    return ids


async def _read_for(consumer: StreamConsumer, seconds: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = await consumer.read(10, block_ms=100)
        got += [e.value.prompt_id for e in batch]
        await consumer.ack([e.entry_id for e in batch])
    return got


async def test_a_killed_consumers_entries_are_claimed_when_its_heartbeat_expires(redis_url, namespace):
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    ids = await _feed(redis, keys, 6)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_url, namespace, str(TTL_MS)], stdout=subprocess.PIPE, text=True
    )
    try:
        held = (await asyncio.to_thread(holder.stdout.readline)).strip().split(",")
        assert len(held) == 3
        survivor = _consumer(redis, keys, "survivor")
        # Alive but slow: three TTLs later the holder still has its entries (it keeps beating).
        while_alive = await _read_for(survivor, 3 * TTL_MS / 1000)
        assert sorted(while_alive) == sorted(set(ids) - set(held))
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        after: list[str] = []
        deadline = killed_at + 30
        while len(after) < 3:
            assert time.monotonic() < deadline, "the killed consumer's entries were not claimed within 30 s"
            after += await _read_for(survivor, 0.1)
        print(f"claimed {len(after)} entries {time.monotonic() - killed_at:.2f} s after SIGKILL (TTL {TTL_MS} ms)")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(after) == sorted(held) and survivor.stats.reclaimed == 3  # each exactly once
    assert (await redis.xpending(keys.prompts, PROMPT_GROUP))["pending"] == 0
    # The dead holder, now holding nothing, is forgotten on the next scan (set and group do not grow).
    await asyncio.sleep(TTL_MS / 3000 + 0.05)
    await survivor.read(1, block_ms=10)
    names = {c["name"].decode() for c in await redis.xinfo_consumers(keys.prompts, PROMPT_GROUP)}
    assert "holder" not in names and await redis.sismember(registry_key(keys.prompts, PROMPT_GROUP), "holder") == 0
    await redis.aclose()


async def test_a_clean_stop_frees_the_held_entries_at_once(redis_url, namespace):
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await _feed(redis, keys, 2)
    leaving = _consumer(redis, keys, "leaving")
    stop = asyncio.Event()
    heartbeat = leaving.heartbeat()
    await heartbeat.beat()  # as a worker does before its first read
    beat = asyncio.create_task(heartbeat.run(stop))
    held = await leaving.read(2)
    assert len(held) == 2
    assert await redis.exists(alive_key(keys.prompts, PROMPT_GROUP, "leaving")) == 1
    stop.set()  # e.g. a drain that abandoned these prompts: the key goes with it
    await asyncio.wait_for(beat, 5)
    assert await redis.exists(alive_key(keys.prompts, PROMPT_GROUP, "leaving")) == 0
    # With the idle fallback at 10 minutes, only the stopped heartbeat lets the next consumer take them now.
    taken = await _consumer(redis, keys, "next").read(2, block_ms=10)
    assert sorted(e.value.prompt_id for e in taken) == ["q0", "q1"]
    await redis.aclose()


async def test_consumers_that_never_heartbeat_are_judged_by_idle_time_only(redis_url, namespace):
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await _feed(redis, keys, 1)
    old = StreamConsumer(
        redis, keys.prompts, PROMPT_GROUP, "old-worker", decode=PromptRecord.decode, dead_stream=keys.dead
    )
    assert len(await old.read(1)) == 1  # an older worker without heartbeats holds it
    assert await _read_for(_consumer(redis, keys, "new-worker"), 3 * TTL_MS / 1000) == []  # not stolen
    await redis.aclose()


async def test_a_consumer_reports_its_loaded_version_at_once_and_older_values_still_read(redis_url, namespace):
    """The heartbeat carries the loaded policy version; a change reaches the key without waiting for
    the renewal (TTL / 3), and a consumer still writing the bare "1" is live with no version."""
    from opd.stream_heartbeat import live_versions

    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    loaded = {"version": 3}
    consumer = StreamConsumer(
        redis,
        keys.prompts,
        PROMPT_GROUP,
        "w1",
        decode=PromptRecord.decode,
        dead_stream=keys.dead,
        heartbeat_ttl_ms=60_000,
    )
    stop = asyncio.Event()
    beat = asyncio.create_task(consumer.heartbeat(version=lambda: loaded["version"]).run(stop))
    await redis.set(alive_key(keys.prompts, PROMPT_GROUP, "old"), "1", px=60_000)
    await redis.sadd(registry_key(keys.prompts, PROMPT_GROUP), "old", "gone")
    try:
        deadline = time.monotonic() + 10
        while (await live_versions(redis, consumer.retry, keys.prompts, PROMPT_GROUP)).get("w1") != 3:
            assert time.monotonic() < deadline, "the first beat never wrote version 3"
            await asyncio.sleep(0.01)
        loaded["version"] = 4  # renewal is 20 s away: only the version watch can write it
        while (versions := await live_versions(redis, consumer.retry, keys.prompts, PROMPT_GROUP))["w1"] != 4:
            assert time.monotonic() < deadline, "version 4 never reached the key"
            await asyncio.sleep(0.01)
        assert versions == {"w1": 4, "old": None}  # "gone" has no key: not live
    finally:
        stop.set()
        await beat
        await redis.aclose()
