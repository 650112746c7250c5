"""Consumer liveness for the Redis Streams transport: heartbeats, and the consumers whose heartbeat stopped.

A consumer that heartbeats keeps the key `{stream}:alive:{group}:{consumer}`
set with a TTL (refreshed every TTL / 3 by `Heartbeat.run`) and is listed in
the set `{stream}:heartbeating:{group}`. A listed consumer whose key has
expired is dead (killed, crashed, or cut off for longer than the TTL): the
others may claim its pending entries at once (`StreamConsumer`, XPENDING by
consumer + XCLAIM), instead of waiting for the entries' idle time to reach
`claim_idle_ms`. A live consumer keeps its entries however long its work
takes. A consumer that never heartbeats (an older worker, the trainer) is
not judged here; only the idle-time reclaim applies to it.

The key's value is a `protos.heartbeat.WorkerHeartbeat`: the policy version
the consumer has loaded (`version`, a callable the owner passes; a rollout
worker passes its engine's). A change of version is written within
`VERSION_POLL_S`, not at the next renewal, and `live_versions` reads the
versions of the live consumers: the trainer's prompt feeder admits prompts by
the oldest (`student_trainer.groups.admission`).

A clean stop deletes the key, so the prompts a draining worker abandons are
taken over at once. Consumers that are dead and hold nothing are removed
from the set and from the group, so neither grows with every restarted pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from opd.streams import RedisRetry
from protos.heartbeat import WorkerHeartbeat
from protos.records import RecordError

log = logging.getLogger(__name__)
VERSION_POLL_S = 0.05  # how soon a new loaded version reaches the key


def alive_key(stream: str, group: str, consumer: str) -> str:
    return f"{stream}:alive:{group}:{consumer}"


def registry_key(stream: str, group: str) -> str:
    return f"{stream}:heartbeating:{group}"


class Heartbeat:
    """Keeps `consumer`'s alive key set (TTL `ttl_s`) while `run` runs; deletes it when `run` ends. `version`: the
    policy version the consumer has loaded (read on every beat, and watched every `VERSION_POLL_S`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        ttl_s: float,
        retry: RedisRetry,
        version: Callable[[], int | None] | None = None,
    ) -> None:
        self.redis, self.ttl_s, self.retry, self.version = redis, ttl_s, retry, version
        self.key, self.registry, self.consumer = (
            alive_key(stream, group, consumer),
            registry_key(stream, group),
            consumer,
        )
        self.reported: int | None = None  # the version in the key now

    async def beat(self) -> None:
        """Set the alive key for another `ttl_s`, with the loaded version (and make sure this consumer is listed)."""
        version = self.version() if self.version is not None else None
        value = WorkerHeartbeat(version).encode()

        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.key, value, px=max(1, int(self.ttl_s * 1000)))
                pipe.sadd(self.registry, self.consumer)
                await pipe.execute()

        await self.retry.run(write, f"SET {self.key}")
        self.reported = version

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every `ttl_s / 3`, and at once when the loaded version changes, until `stop`; then delete the key
        (a clean stop frees held entries at once)."""
        try:
            while not stop.is_set():
                await self.beat()
                renew_at = time.monotonic() + self.ttl_s / 3
                while not stop.is_set() and time.monotonic() < renew_at:
                    if self.version is not None and self.version() != self.reported:
                        break  # a new version loaded: say so now
                    wait_s = min(VERSION_POLL_S if self.version else self.ttl_s, renew_at - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(0.0, wait_s))
        finally:
            with contextlib.suppress(Exception):  # best effort: the key expires by itself anyway
                await asyncio.wait_for(self.redis.delete(self.key), 5)


async def live_versions(redis: aioredis.Redis, retry: RedisRetry, stream: str, group: str) -> dict[str, int | None]:
    """The consumers of `group` whose alive key is set -> the policy version they reported (None: none said, or
    an older consumer's value). A value that does not decode counts as no version (logged)."""
    members = await retry.run(lambda: redis.smembers(registry_key(stream, group)), "SMEMBERS")
    names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    if not names:
        return {}
    values = await retry.run(lambda: redis.mget([alive_key(stream, group, n) for n in names]), "MGET alive keys")
    out: dict[str, int | None] = {}
    for name, value in zip(names, values, strict=True):
        if value is None:
            continue  # expired: dead, or stopped
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            out[name] = WorkerHeartbeat.decode(raw).policy_version
        except RecordError as exc:
            log.warning("heartbeat of %s not read: %s", name, exc)
            out[name] = None
    return out


async def dead_consumers(
    redis: aioredis.Redis, retry: RedisRetry, stream: str, group: str, exclude: str
) -> dict[str, int]:
    """Listed consumers of `group` (other than `exclude`) whose alive key expired -> their pending count.

    Dead consumers that hold nothing are forgotten on the way (left out of the set and the group).
    """
    registry = registry_key(stream, group)

    async def query() -> tuple[Any, list[str]]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xpending(stream, group)
            pipe.smembers(registry)
            summary, members = await pipe.execute()
        return summary, sorted(m.decode() for m in members)

    summary, listed = await retry.run(query, f"XPENDING {stream}")
    listed = [name for name in listed if name != exclude]
    if not listed:
        return {}

    async def alive() -> list[int]:
        async with redis.pipeline(transaction=False) as pipe:
            for name in listed:
                pipe.exists(alive_key(stream, group, name))
            return await pipe.execute()

    flags = await retry.run(alive, f"EXISTS {stream}:alive:*")
    pending = {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers") or []}
    dead = {name: pending.get(name, 0) for name, up in zip(listed, flags, strict=True) if not up}
    for name in [n for n, held in dead.items() if held == 0]:
        await _forget(redis, retry, stream, group, name)
        del dead[name]
    return dead


# Atomic, so that a consumer that came back (alive key set) or took entries meanwhile is never deleted:
# XGROUP DELCONSUMER would make its pending entries unclaimable.
_FORGET = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


async def _forget(redis: aioredis.Redis, retry: RedisRetry, stream: str, group: str, consumer: str) -> None:
    """Drop a dead consumer that holds nothing from the set and the group."""

    async def drop() -> int:
        keys = (stream, alive_key(stream, group, consumer), registry_key(stream, group))
        return await redis.eval(_FORGET, 3, *keys, group, consumer)

    if await retry.run(drop, f"XGROUP DELCONSUMER {stream} {group} {consumer}"):
        log.info("forgot consumer %s of %s: its heartbeat stopped and it held nothing", consumer, stream)
