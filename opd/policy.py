"""Policy announcements: which published weight version the rollout workers should sample from.

Owns the `{ns}:policy` hash (the latest announcement) and the
`{ns}:policy:events` channel (the same announcement, published when it is
stored). The trainer announces each published version; workers read the hash
at start and on a poll, and listen on the channel. Versions only move
forward: an announcement older than the stored one is refused, atomically (one
Lua script). The announcement's fields and codec are `protos.records`'.
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from opd.streams import RedisRetry, StreamKeys
from protos.records import PolicyAnnouncement

_ANNOUNCE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'record', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


async def announce_policy(
    redis: aioredis.Redis, keys: StreamKeys, announcement: PolicyAnnouncement, retry: RedisRetry | None = None
) -> bool:
    """Store the announcement in `{ns}:policy` and publish it on `{ns}:policy:events`, unless a version at
    least as new is already there (returns False then). Atomic (one Lua script)."""
    payload = announcement.encode()

    async def run() -> int:
        return await redis.eval(_ANNOUNCE, 2, keys.policy, keys.policy_events, announcement.version, payload)

    return bool(await (retry or RedisRetry()).run(run, f"announce policy v{announcement.version}"))


async def read_policy(
    redis: aioredis.Redis, keys: StreamKeys, retry: RedisRetry | None = None
) -> PolicyAnnouncement | None:
    """The latest announcement, or None when no policy was announced in this namespace."""

    async def run() -> bytes | None:
        # redis-py types replies as bytes or str; opd's clients never decode responses (`connect`)
        return cast(bytes | None, await redis.hget(keys.policy, "record"))

    payload = await (retry or RedisRetry()).run(run, f"HGET {keys.policy}")
    return None if payload is None else PolicyAnnouncement.decode(payload)
