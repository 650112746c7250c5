"""The Redis Streams transport against a real private Redis: delivery, dead letters, reclaim, dedupe,
backpressure, connection loss, password URLs and policy announcements."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from opd.policy import announce_policy, read_policy
from opd.redis_server import free_port, redis_server
from opd.stream_consumer import SeenSet, StreamConsumer, rollout_consumer
from opd.streams import (
    ROLLOUT_GROUP,
    RedisConfig,
    StreamError,
    StreamKeys,
    StreamProducer,
    connect,
    read_dead,
    undelivered,
)
from protos.records import ROLLOUT_SCHEMA, PolicyAnnouncement, RolloutRecord
from tests.fixtures.rollout import make_rollout

pytestmark = pytest.mark.timeout(60)


def _consumer(redis, keys: StreamKeys, name: str, **kw) -> StreamConsumer[RolloutRecord]:
    return StreamConsumer(
        redis,
        keys.rollouts,
        ROLLOUT_GROUP,
        name,
        decode=RolloutRecord.decode,
        dead_stream=keys.dead,
        key_of=lambda r: r.rollout_id,
        **kw,
    )


async def _drain(consumer: StreamConsumer, rounds: int = 5) -> list:
    out = []
    for _ in range(rounds):
        batch = await consumer.read(100, block_ms=50)
        out += batch
        if not batch and out:
            break
    return out


async def test_round_trip_and_bad_entries_go_to_dead_letter(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    producer = StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP)
    good = [make_rollout(i) for i in range(4)]
    await producer.send_many([good[0].encode(), good[1].encode(), b"\x93not-a-record", good[2].encode()])
    await redis.xadd(keys.rollouts, {b"other": b"field"})  # an entry without the payload field
    wrong_schema = good[3].encode().replace(b"\xa6schema" + bytes([ROLLOUT_SCHEMA]), b"\xa6schema\x63")
    await producer.send(wrong_schema)
    consumer = _consumer(redis, keys, "c1")
    entries = await _drain(consumer)
    assert [e.value.rollout_id for e in entries] == ["p/0", "p/1", "p/2"]
    assert entries[1].value.response_ids.tolist() == good[1].response_ids.tolist()
    dead = await read_dead(redis, keys)
    assert len(dead) == 3 and consumer.stats.dead_lettered == 3
    assert b"not valid msgpack" in dead[0]["reason"] and dead[0]["d"] == b"\x93not-a-record"
    assert b"has no 'd' field" in dead[1]["reason"]
    assert b"schema" in dead[2]["reason"] and dead[2]["source"] == keys.rollouts.encode()
    assert await consumer.ack([e.entry_id for e in entries]) == 3
    assert await redis.xlen(keys.rollouts) == 0  # acked and dead-lettered entries are gone
    await redis.aclose()


_KILLED_CONSUMER = textwrap.dedent("""
    import asyncio, sys, time
    from opd.stream_consumer import StreamConsumer
    from opd.streams import ROLLOUT_GROUP, RedisConfig, StreamKeys, connect
    from protos.records import RolloutRecord
    async def main(url, ns):
        redis, keys = connect(RedisConfig(url=url)), StreamKeys(ns)
        c = StreamConsumer(redis, keys.rollouts, ROLLOUT_GROUP, "doomed", decode=RolloutRecord.decode,
                           dead_stream=keys.dead, key_of=lambda r: r.rollout_id)
        first = await c.read(5, block_ms=1000)
        await c.ack([e.entry_id for e in first])
        print(",".join(e.value.rollout_id for e in first), flush=True)
        second = await c.read(7, block_ms=1000)
        print(",".join(e.value.rollout_id for e in second), flush=True)
        time.sleep(60)  # killed here: read, never acked
    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


async def test_killed_consumer_entries_are_reclaimed_and_acked_exactly_once(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    ids = [f"p/{i}" for i in range(20)]
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send_many([make_rollout(i).encode() for i in range(20)])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONSUMER, redis_url, namespace], stdout=subprocess.PIPE, text=True
    )
    acked_by_doomed = (await asyncio.to_thread(proc.stdout.readline)).strip().split(",")
    held_by_doomed = (await asyncio.to_thread(proc.stdout.readline)).strip().split(",")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked_by_doomed) == 5 and len(held_by_doomed) == 7
    survivor = _consumer(redis, keys, "survivor", claim_idle_ms=300)
    acked_by_survivor: list[str] = []
    deadline = time.monotonic() + 20
    while len(acked_by_doomed) + len(acked_by_survivor) < 20 and time.monotonic() < deadline:
        batch = await survivor.read(4, block_ms=100)
        acked_by_survivor += [e.value.rollout_id for e in batch]
        await survivor.ack([e.entry_id for e in batch])
    assert sorted(acked_by_doomed + acked_by_survivor) == sorted(ids)  # every id exactly once
    assert set(held_by_doomed) <= set(acked_by_survivor) and survivor.stats.reclaimed == 7
    assert (await redis.xpending(keys.rollouts, ROLLOUT_GROUP))["pending"] == 0
    await redis.aclose()


async def test_entry_delivered_too_often_is_dead_lettered(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send(make_rollout(0).encode())
    assert len(await _consumer(redis, keys, "crashes").read(1)) == 1  # delivery 1, never acked
    retrier = _consumer(redis, keys, "retrier", claim_idle_ms=50, max_deliveries=3)
    await asyncio.sleep(0.1)
    second = await retrier.read(1, block_ms=10)  # delivery 2: reclaimed, fails again (never acked)
    assert [e.value.rollout_id for e in second] == ["p/0"]
    retrier.release([second[0].entry_id])
    await asyncio.sleep(0.1)
    third = await retrier.read(1, block_ms=10)  # delivery 3: released, so not a duplicate; fails again
    assert [e.value.rollout_id for e in third] == ["p/0"]
    retrier.release([third[0].entry_id])
    await asyncio.sleep(0.1)
    assert await retrier.read(1, block_ms=10) == []  # delivery 4 > max_deliveries: dead-lettered
    dead = await read_dead(redis, keys)
    assert len(dead) == 1 and b"delivered 4 times" in dead[0]["reason"] and retrier.stats.dead_lettered == 1
    assert (await redis.xpending(keys.rollouts, ROLLOUT_GROUP))["pending"] == 0
    await redis.aclose()


async def test_restarted_consumer_resumes_its_own_pending_entries_first(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send_many([make_rollout(i).encode() for i in range(6)])
    before = await _consumer(redis, keys, "w-0").read(3)
    again = _consumer(redis, keys, "w-0")  # same name, new process state: long claim idle, so no XAUTOCLAIM
    first = await again.read(3)
    assert [e.entry_id for e in first] == [e.entry_id for e in before]
    rest = await again.read(10, block_ms=50)
    assert [e.value.rollout_id for e in rest] == ["p/3", "p/4", "p/5"]
    await redis.aclose()


async def test_dedupe_skips_seeded_and_repeated_ids_and_acks_them(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    payloads = [make_rollout(i).encode() for i in (0, 1, 2)] + [make_rollout(1).encode()]  # p/1 twice
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send_many(payloads)
    consumer = rollout_consumer(redis, namespace, "trainer-0", used_ids=["p/0"])  # p/0 trained before a crash
    entries = await _drain(consumer)
    assert [e.key for e in entries] == ["p/1", "p/2"]
    assert consumer.stats.duplicates_skipped == 2
    assert (await redis.xpending(keys.rollouts, ROLLOUT_GROUP))["pending"] == 2  # only the held ones
    await consumer.keepalive()  # long holds (until a checkpoint) stay ours
    assert await consumer.ack([e.entry_id for e in entries]) == 2 and not consumer.held
    assert await consumer.ack([entries[0].entry_id]) == 0  # acking twice is harmless


async def test_consumer_acks_the_entries_it_holds_by_key(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send_many([make_rollout(i).encode() for i in range(3)])
    consumer = rollout_consumer(redis, namespace, "trainer-0")
    entries = await _drain(consumer)
    assert consumer.held_entry_ids(["p/2", "p/0", "p/9"]) == [entries[2].entry_id, entries[0].entry_id]
    assert await consumer.ack_keys(["p/0", "p/2"]) == 2  # e.g. the rollouts a committed checkpoint used
    assert list(consumer.held.values()) == ["p/1"]
    assert (await redis.xpending(keys.rollouts, ROLLOUT_GROUP))["pending"] == 1
    assert await consumer.ack_keys(["p/0"]) == 0  # no longer held: nothing to ack
    consumer.release([entries[1].entry_id])
    assert consumer.held_entry_ids(["p/1"]) == [] and "p/1" not in consumer.seen
    await redis.aclose()


async def test_rollouts_dedupe_by_prompt_and_sample_whatever_the_rollout_id(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    copy = dataclasses.replace(make_rollout(0), rollout_id="p@2-0/0")  # p sample 0 again, from another prompt entry
    no_index = dataclasses.replace(make_rollout(5), rollout_id="p-five", meta={})
    payloads = [make_rollout(0).encode(), copy.encode(), make_rollout(1).encode(), no_index.encode()]
    await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send_many(payloads)
    consumer = rollout_consumer(redis, namespace, "trainer-0")
    entries = await _drain(consumer)
    assert [(e.value.rollout_id, e.key) for e in entries] == [("p/0", "p/0"), ("p/1", "p/1")]  # the first copy kept
    assert consumer.stats.duplicates_skipped == 1
    [dead] = await read_dead(redis, keys)
    assert b"no sample index" in dead["reason"]
    await redis.aclose()


def test_seen_set_is_bounded() -> None:
    seen = SeenSet(max_size=3, initial=["a", "b", "c"])
    seen.add("d")
    assert "a" not in seen and "d" in seen and len(seen) == 3


async def test_backpressure_stops_at_max_pending_and_resumes(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    producer = StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP, max_pending=5, poll_s=(0.01, 0.05))

    async def produce() -> None:
        for i in range(12):
            await producer.send(make_rollout(i).encode())

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.5)
    assert not task.done()
    assert await undelivered(redis, producer.retry, keys.rollouts, ROLLOUT_GROUP) == 5  # stopped exactly there
    consumer = _consumer(redis, keys, "c")
    got: list[str] = []
    while len(got) < 12:
        batch = await consumer.read(3, block_ms=500)
        got += [e.value.rollout_id for e in batch]
    await asyncio.wait_for(task, 5)
    assert got == [f"p/{i}" for i in range(12)] and producer.retry.stats.backpressure_wait_s > 0.3
    await redis.aclose()


async def test_connection_loss_is_retried_until_redis_returns(namespace: str) -> None:
    port = free_port()
    keys = StreamKeys(namespace)
    redis = connect(RedisConfig(url=f"redis://127.0.0.1:{port}/0", retry_for_s=30))
    producer = StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP)
    with redis_server(port=port):
        await producer.send(make_rollout(0).encode())
    send = asyncio.create_task(producer.send(make_rollout(1).encode()))  # server down: retried with backoff
    await asyncio.sleep(1.0)
    assert not send.done()
    with redis_server(port=port):  # a fresh, empty server on the same port
        await asyncio.wait_for(send, 15)
        entries = await _drain(_consumer(redis, keys, "c"))
        assert [e.value.rollout_id for e in entries] == ["p/1"]
        assert producer.retry.stats.retries >= 2
    await redis.aclose()


async def test_unreachable_redis_fails_with_a_clear_error(namespace: str) -> None:
    redis = connect(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0"))
    from opd.streams import RedisRetry

    producer = StreamProducer(redis, StreamKeys(namespace).rollouts, ROLLOUT_GROUP, retry=RedisRetry(retry_for_s=0.5))
    with pytest.raises(StreamError, match="unreachable for 0 s during XGROUP CREATE"):
        await producer.send(b"x")


async def test_password_url_and_wrong_password(namespace: str) -> None:
    with redis_server(password="s3cret") as url:
        keys = StreamKeys(namespace)
        redis = connect(RedisConfig(url=url))
        await StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP).send(make_rollout(0).encode())
        assert len(await _drain(_consumer(redis, keys, "c"))) == 1
        await redis.aclose()
        wrong = connect(RedisConfig(url=url.replace("s3cret", "nope")))
        with pytest.raises(Exception, match="(?i)auth|password"):  # not retried for retry_for_s
            await StreamProducer(wrong, keys.rollouts, ROLLOUT_GROUP).send(b"x")
        await wrong.aclose()


def test_config_rejects_unknown_url_schemes_and_builds_tls_clients() -> None:
    with pytest.raises(ValueError, match="rediss://"):
        RedisConfig(url="http://localhost:6379")
    client = connect(RedisConfig(url="rediss://:pw@example.invalid:6380/0", tls_verify=False))
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == "pw" and kwargs["ssl_cert_reqs"] == "none"


async def test_policy_announcements_are_monotonic_and_published(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    assert await read_policy(redis, keys) is None
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(keys.policy_events)
        assert await announce_policy(redis, keys, PolicyAnnouncement(2, "/w/v2", step=20))
        assert not await announce_policy(redis, keys, PolicyAnnouncement(1, "/w/v1"))  # older: refused
        message = None
        for _ in range(3):  # the first read may consume the subscribe confirmation
            message = message or await pubsub.get_message(timeout=2)
        assert PolicyAnnouncement.decode(message["data"]).uri == "/w/v2"
    assert (await read_policy(redis, keys)).version == 2
    await redis.aclose()
