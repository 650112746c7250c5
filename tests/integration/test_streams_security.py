"""Redis transport limits and secrets against a real private Redis: dead letters bounded in bytes, and the
password read from a file instead of the URL."""

from __future__ import annotations

import pytest
import redis.exceptions as rex

from opd.config import ConfigError, validate_config
from opd.redis_server import redis_server
from opd.stream_consumer import DEAD_PAYLOAD_MAX_BYTES, DEAD_REASON_MAX_CHARS, StreamConsumer
from opd.streams import ROLLOUT_GROUP, RedisConfig, StreamKeys, StreamProducer, connect, read_dead
from protos.records import RolloutRecord

pytestmark = pytest.mark.timeout(60)


async def test_dead_letter_keeps_at_most_64_kib_of_payload(redis_url: str, namespace: str) -> None:
    redis, keys = connect(RedisConfig(url=redis_url)), StreamKeys(namespace)
    producer = StreamProducer(redis, keys.rollouts, ROLLOUT_GROUP)
    big = bytes(range(256)) * 800  # 204,800 bytes, not msgpack
    exact = b"\xc1" * DEAD_PAYLOAD_MAX_BYTES  # 0xc1 is never valid msgpack; exactly at the cap
    small = b"\xc1tiny"
    for payload in (big, exact, small):
        await producer.send(payload)
    consumer = StreamConsumer(
        redis, keys.rollouts, ROLLOUT_GROUP, "c", decode=RolloutRecord.decode, dead_stream=keys.dead, dead_maxlen=10
    )
    assert await consumer.read(10, block_ms=50) == []
    dead = await read_dead(redis, keys)
    assert [d["payload_bytes"] for d in dead] == [b"204800", str(DEAD_PAYLOAD_MAX_BYTES).encode(), b"5"]
    assert [d["truncated"] for d in dead] == [b"1", b"0", b"0"]
    assert dead[0]["d"] == big[:DEAD_PAYLOAD_MAX_BYTES] and dead[1]["d"] == exact and dead[2]["d"] == small
    for entry in dead:  # the reason and the ids are kept whole (the reason up to its own cap)
        assert entry["reason"] and entry["entry_id"] and entry["source"] == keys.rollouts.encode()
        size = sum(len(k) + len(v) for k, v in entry.items())
        assert size <= DEAD_PAYLOAD_MAX_BYTES + DEAD_REASON_MAX_CHARS + 512
    await redis.aclose()


async def test_password_file_authenticates_and_stays_out_of_the_url(tmp_path) -> None:
    password = "file-pw-9c1e"
    with redis_server(password=password) as url:
        bare = url.replace(f":{password}@", "")
        secret = tmp_path / "redis-password"
        secret.write_text(password + "\n")  # as `kubectl create secret --from-file` or an editor leaves it
        config = RedisConfig(url=bare, password_file=str(secret))
        assert password not in config.model_dump_json()
        client = connect(config)
        assert await client.ping()
        await client.aclose()
        secret.write_text("wrong-password")
        client = connect(config)  # re-read at connect
        with pytest.raises(rex.AuthenticationError):
            await client.ping()
        await client.aclose()
        with pytest.raises(rex.AuthenticationError):  # without the file: refused, so the file did the work
            await connect(RedisConfig(url=bare)).ping()


def test_password_file_errors_name_the_option_and_never_the_password(tmp_path) -> None:
    with pytest.raises(ConfigError, match="keep only one") as err:
        validate_config(RedisConfig, {"url": "redis://:pw-in-url-77@h:6379/0", "password_file": "/x"})
    assert "pw-in-url-77" not in str(err.value)
    with pytest.raises(ConfigError, match=r"redis.password_file '.*missing' cannot be read"):
        connect(RedisConfig(password_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        connect(RedisConfig(password_file=str(empty)))
