"""`opd queue` against a real Redis: dead letters listed with their reasons, requeued or dropped by id or by
reason, with a dry run that changes nothing."""

from __future__ import annotations

import asyncio

import pytest

from opd.cli import main as opd_main
from opd.stream_consumer import StreamConsumer
from opd.streams import PAYLOAD, PROMPT_GROUP, ROLLOUT_GROUP, RedisConfig, StreamKeys, StreamProducer, connect
from protos.records import PromptRecord, RolloutRecord

pytestmark = pytest.mark.timeout(60)


def _prompt_consumer(redis, keys: StreamKeys, name: str) -> StreamConsumer[PromptRecord]:
    return StreamConsumer(
        redis,
        keys.prompts,
        PROMPT_GROUP,
        name,
        decode=PromptRecord.decode,
        dead_stream=keys.dead,
        claim_idle_ms=50,
        max_deliveries=1,
    )


async def _make_dead_letters(redis, keys: StreamKeys) -> None:
    """Three dead letters the way consumers make them: a prompt delivered too often, an undecodable prompt,
    an undecodable rollout."""
    prompts = StreamProducer(redis, keys.prompts, PROMPT_GROUP)
    await prompts.send(PromptRecord("q-over", group_size=2, messages=[{"role": "user", "content": "hi"}]).encode())
    assert len(await _prompt_consumer(redis, keys, "dead-worker").read(1)) == 1  # read, never acked: it died
    await asyncio.sleep(0.1)  # idle past claim_idle_ms: the next worker takes it over, as delivery 2 of max 1
    await prompts.send(b"\x93not a prompt")
    assert await _prompt_consumer(redis, keys, "next-worker").read(10, block_ms=100) == []
    await redis.xadd(keys.rollouts, {PAYLOAD: b"garbage"})
    rollouts = StreamConsumer(
        redis, keys.rollouts, ROLLOUT_GROUP, "trainer", decode=RolloutRecord.decode, dead_stream=keys.dead
    )
    assert await rollouts.read(10, block_ms=100) == []
    assert await redis.xlen(keys.dead) == 3


def _queue(capsys, *args: str) -> tuple[int, str, str]:
    code = opd_main(["queue", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def dead(redis_url: str, namespace: str):
    async def make() -> None:
        redis = connect(RedisConfig(url=redis_url))
        await _make_dead_letters(redis, StreamKeys(namespace))
        await redis.aclose()

    asyncio.run(make())
    return ["--redis-url", redis_url, "--redis-namespace", namespace]


async def _dead_entries(redis_url: str, namespace: str) -> dict[str, dict[bytes, bytes]]:
    redis = connect(RedisConfig(url=redis_url))
    entries = await redis.xrange(StreamKeys(namespace).dead)
    await redis.aclose()
    return {eid.decode(): fields for eid, fields in entries}


def test_list_shows_every_dead_letter_with_its_reason_and_a_count_per_reason(dead, namespace, capsys):
    code, out, _ = _queue(capsys, "list", *dead)
    assert code == 0
    assert f"{namespace}:dead: 3 dead letters (prompts 2, rollouts 1); 3 selected" in out
    assert "delivered N times without an ack (max_deliveries=N)" in out  # the per-reason summary
    assert "delivered 2 times without an ack (max_deliveries=1)" in out  # the entry itself
    assert out.count("RecordError") >= 2 and "dead-worker" not in out.split("reasons:")[0]
    code, out, _ = _queue(capsys, "list", *dead, "--source", "rollouts")
    assert "1 selected" in out and "rollouts" in out.split("REASON")[1] and "prompts " not in out.split("REASON")[1]


def test_requeue_by_reason_with_a_dry_run_first(dead, redis_url, namespace, capsys):
    before = asyncio.run(_dead_entries(redis_url, namespace))
    code, out, _ = _queue(capsys, "requeue", *dead, "--reason", "DELIVERED", "--dry-run")
    assert code == 0 and "would requeue 1 of 1 selected dead letters (dry run)" in out
    assert asyncio.run(_dead_entries(redis_url, namespace)) == before  # nothing changed

    code, out, _ = _queue(capsys, "requeue", *dead, "--reason", "delivered")
    assert code == 0 and "requeue 1 of 1 selected dead letters" in out
    after = asyncio.run(_dead_entries(redis_url, namespace))
    assert len(after) == 2 and all(b"delivered" not in f[b"reason"] for f in after.values())

    async def read_again() -> list:
        redis = connect(RedisConfig(url=redis_url))
        entries = await _prompt_consumer(redis, StreamKeys(namespace), "fresh-worker").read(10, block_ms=200)
        await redis.aclose()
        return entries

    entries = asyncio.run(read_again())  # a worker gets the prompt again, as a new entry
    assert [e.value.prompt_id for e in entries] == ["q-over"] and entries[0].value.group_size == 2


def test_undecodable_payloads_are_not_requeued_and_can_be_dropped_by_id(dead, redis_url, namespace, capsys):
    entries = asyncio.run(_dead_entries(redis_url, namespace))
    rollout_dead_id = next(i for i, f in entries.items() if f[b"source"].endswith(b":rollouts"))
    code, out, _ = _queue(capsys, "requeue", *dead, "--ids", rollout_dead_id)
    assert code == 1
    assert f"not requeued: {rollout_dead_id}: its payload does not decode" in out
    assert rollout_dead_id in asyncio.run(_dead_entries(redis_url, namespace))  # left in place

    code, out, _ = _queue(capsys, "drop", *dead, "--ids", rollout_dead_id, "--dry-run")
    assert code == 0 and rollout_dead_id in asyncio.run(_dead_entries(redis_url, namespace))
    code, out, _ = _queue(capsys, "drop", *dead, "--ids", rollout_dead_id)
    assert code == 0 and "drop 1 of 1 selected dead letters" in out
    assert set(asyncio.run(_dead_entries(redis_url, namespace))) == set(entries) - {rollout_dead_id}


def test_the_original_entry_id_selects_too_and_all_drops_one_source(dead, redis_url, namespace, capsys):
    entries = asyncio.run(_dead_entries(redis_url, namespace))
    original = next(f[b"entry_id"].decode() for f in entries.values() if b"delivered" in f[b"reason"])
    code, out, _ = _queue(capsys, "list", *dead, "--ids", original)
    assert code == 0 and "1 selected" in out and original in out
    code, out, _ = _queue(capsys, "drop", *dead, "--source", "prompts", "--all")
    assert code == 0 and "drop 2 of 2 selected" in out
    left = asyncio.run(_dead_entries(redis_url, namespace))
    assert [f[b"source"].decode() for f in left.values()] == [f"{namespace}:rollouts"]


def test_acting_without_a_selection_or_with_a_bad_action_is_a_clear_error(dead, capsys):
    code, _, err = _queue(capsys, "drop", *dead)
    assert code == 2 and "needs a selection: --ids ID [ID ...], --reason TEXT, or --all" in err
    code, _, err = _queue(capsys, "purge", *dead)
    assert code == 2 and "unknown action 'purge'" in err
    code, _, err = _queue(capsys, "list", "--redis-url", "http://nope")
    assert code == 2 and "rediss://" in err


def test_unreachable_redis_is_reported_not_a_traceback(capsys):
    from opd.redis_server import free_port

    code, _, err = _queue(capsys, "list", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--retry-for-s", "0.5")
    assert code == 2 and "unreachable" in err and "Traceback" not in err
