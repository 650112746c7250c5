"""The consumer side of the Redis Streams transport: reading a stream as one consumer of a group.

Owns the consumer's bookkeeping: which entries it holds (read, not yet
acked) and under which dedupe key, so callers acknowledge by key (for
rollouts, `sample_key`: prompt id and sample index) as well as by entry id;
the dedupe memory (`SeenSet`, seeded from a checkpoint); re-reading its own
pending entries after a restart; reclaiming entries a dead consumer left
pending (at once from a consumer whose heartbeat stopped, `opd.stream_heartbeat`; else once idle past `claim_idle_ms`,
XAUTOCLAIM); the dead-letter stream for
undecodable or over-delivered entries; and `rollout_consumer`, the one way
the trainer (and the tests) read `{ns}:rollouts`.

Does not know what the payloads mean: callers pass a decoder
(`protos.records`) and a function that names a record's dedupe key. Retries
and the counters (`StreamStats`) are the `RedisRetry` passed in. All calls
are asyncio.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.typing import StreamIdT

from opd.stream_heartbeat import Heartbeat, alive_key, dead_consumers
from opd.streams import PAYLOAD, ROLLOUT_GROUP, RedisRetry, StreamKeys, StreamStats, ensure_group
from protos.records import RecordError, RolloutRecord

# A dead-letter entry keeps the reason, the ids and at most 64 KiB of the payload (with `truncated` and the
# original `payload_bytes`); the stream keeps about the newest DEAD_MAXLEN entries: at most ~130 MiB.
DEAD_PAYLOAD_MAX_BYTES = 64 * 1024
DEAD_REASON_MAX_CHARS = 2000
DEAD_MAXLEN = 2_000

log = logging.getLogger(__name__)
T = TypeVar("T")

# Take a dead consumer's pending entries, up to ARGV[4], whatever their idle time. Atomic: nobody can have
# claimed them between reading the consumer's list and claiming, and a consumer that came back (its alive
# key set again) keeps what it holds.
_CLAIM_FROM_DEAD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
if #rows == 0 then return {} end
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
"""


class SeenSet:
    """Record ids already used (bounded, oldest forgotten first): the consumer's dedupe memory."""

    def __init__(self, max_size: int = 1_000_000, initial: Iterable[str] = ()) -> None:
        self.max_size = max_size
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.update(initial)

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.max_size:
            self._ids.popitem(last=False)

    def discard(self, key: str) -> None:
        self._ids.pop(key, None)

    def update(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One delivered, decoded entry; ack it by `entry_id` once its work is durable."""

    entry_id: str
    value: T
    key: str | None = None


@dataclass
class _Raw:
    entry_id: str
    fields: dict[bytes, bytes] = field(default_factory=dict)


class StreamConsumer(Generic[T]):
    """Reads one stream as `consumer` of `group`, decoding each entry with `decode`.

    `read` returns decoded entries that stay pending until `ack`. It first
    re-reads this consumer's own pending entries (a restart under the same
    name); with `heartbeat_ttl_ms`, it then claims every entry of consumers
    whose heartbeat stopped (checked every TTL / 3; run `heartbeat()` to beat
    for this one); then, periodically, it reclaims entries idle for
    `claim_idle_ms` in other consumers (XAUTOCLAIM: the fallback for consumers
    that do not heartbeat); then it reads new ones. Entries that fail to decode, or
    were delivered more than `max_deliveries` times, go to `dead_stream` with
    the reason and are acked. With `key_of`, an entry whose key is in `seen`
    (already used; seed it from a checkpoint) is acked and skipped. An entry
    whose work failed is handed back with `release` (retried later, up to
    `max_deliveries`); `keepalive` keeps long-held entries from being reclaimed.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        decode: Callable[[bytes], T],
        dead_stream: str,
        key_of: Callable[[T], str] | None = None,
        seen: SeenSet | None = None,
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        retry: RedisRetry | None = None,
        dead_maxlen: int = DEAD_MAXLEN,
        heartbeat_ttl_ms: int | None = None,
    ) -> None:
        self.redis, self.stream, self.group, self.consumer = redis, stream, group, consumer
        self.decode, self.key_of, self.dead_stream = decode, key_of, dead_stream
        self.seen = seen if seen is not None else SeenSet()
        self.claim_idle_ms, self.max_deliveries, self.dead_maxlen = claim_idle_ms, max_deliveries, dead_maxlen
        self.retry = retry or RedisRetry()
        self.held: dict[str, str | None] = {}  # entry id -> dedupe key, for entries read and not yet acked
        self._held_by_key: dict[str, str] = {}  # dedupe key -> entry id, for the held entries that have a key
        self._backlog_cursor: str | None = "0"  # entries pending under our name from an earlier run come first
        self._claim_cursor, self._next_claim = "0-0", 0.0
        self.heartbeat_ttl_ms, self._next_liveness = heartbeat_ttl_ms, 0.0
        self._group_ready = False

    @property
    def stats(self) -> StreamStats:
        return self.retry.stats

    async def read(self, count: int, block_ms: int = 1000) -> list[Entry[T]]:
        """Up to `count` entries (pending until acked); blocks up to `block_ms` when none are ready."""
        if not self._group_ready:
            await ensure_group(self.redis, self.retry, self.stream, self.group)
            self._group_ready = True
        raws: list[_Raw] = []
        if self._backlog_cursor is not None:
            raws = await self._xreadgroup(self._backlog_cursor, count, None)
            self._backlog_cursor = raws[-1].entry_id if raws else None
        if len(raws) < count and self.heartbeat_ttl_ms and time.monotonic() >= self._next_liveness:
            raws += await self._claim_from_dead(count - len(raws))
        if len(raws) < count and time.monotonic() >= self._next_claim:
            raws += await self._reclaim(count - len(raws))
        if len(raws) < count:
            raws += await self._xreadgroup(">", count - len(raws), None if raws else block_ms)
        return await self._accept(raws)

    async def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[_Raw]:
        async def read() -> Any:
            return await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
            )

        reply = await self.retry.run(read, f"XREADGROUP {self.stream}")
        entries = reply[0][1] if reply else []
        return [_Raw(eid.decode(), fields or {}) for eid, fields in entries]

    async def _reclaim(self, count: int) -> list[_Raw]:
        """XAUTOCLAIM entries idle past `claim_idle_ms`; the over-delivered ones go to the dead stream."""

        async def claim() -> Any:
            return await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=self._claim_cursor, count=count
            )

        cursor, entries, *_ = await self.retry.run(claim, f"XAUTOCLAIM {self.stream}")
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":  # one full pass done: wait before scanning again
            self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        raws = [_Raw(eid.decode(), fields or {}) for eid, fields in entries if eid.decode() not in self.held]
        if not raws:
            return []
        self.stats.reclaimed += len(raws)
        log.info("reclaimed %d entries of %s idle > %d ms", len(raws), self.stream, self.claim_idle_ms)
        return await self._without_over_delivered(raws)

    def heartbeat(self, ttl_s: float | None = None, version: Callable[[], int | None] | None = None) -> Heartbeat:
        """This consumer's heartbeat (run it as a task while the consumer works; TTL: `heartbeat_ttl_ms`;
        `version`: the policy version it has loaded, reported in the key)."""
        ttl = ttl_s if ttl_s is not None else (self.heartbeat_ttl_ms or 15_000) / 1000
        return Heartbeat(self.redis, self.stream, self.group, self.consumer, ttl, self.retry, version)

    async def _claim_from_dead(self, count: int) -> list[_Raw]:
        """XCLAIM the pending entries of consumers whose heartbeat expired, whatever their idle time."""
        assert self.heartbeat_ttl_ms
        dead = await dead_consumers(self.redis, self.retry, self.stream, self.group, exclude=self.consumer)
        raws: list[_Raw] = []
        for name in dead:
            if len(raws) >= count:
                break
            raws += await self._claim_all_of(name, count - len(raws))
        if sum(dead.values()) <= len(raws):  # nothing left behind: look again in a third of the TTL
            self._next_liveness = time.monotonic() + self.heartbeat_ttl_ms / 3000
        if not raws:
            return []
        self.stats.reclaimed += len(raws)
        log.warning(
            "claimed %d entries of %s from %s: heartbeat expired (> %.0f s)",
            len(raws),
            self.stream,
            ", ".join(sorted(dead)),
            self.heartbeat_ttl_ms / 1000,
        )
        return await self._without_over_delivered(raws)

    async def _claim_all_of(self, consumer: str, count: int) -> list[_Raw]:
        async def claim() -> list[Any]:
            keys = (self.stream, alive_key(self.stream, self.group, consumer))
            return await self.redis.eval(_CLAIM_FROM_DEAD, 2, *keys, self.group, consumer, self.consumer, count)

        entries = await self.retry.run(claim, f"XCLAIM {self.stream} from {consumer}")
        return [_Raw(e[0].decode(), dict(zip(e[1][::2], e[1][1::2], strict=True))) for e in entries if e and e[1]]

    async def _without_over_delivered(self, raws: list[_Raw]) -> list[_Raw]:
        """Dead-letter the entries delivered more than `max_deliveries` times; the rest."""
        deliveries = await self._delivery_counts([r.entry_id for r in raws])
        over = [r for r in raws if deliveries.get(r.entry_id, 0) > self.max_deliveries]
        if over:
            await self.dead_letter(
                [
                    (
                        r.entry_id,
                        r.fields.get(PAYLOAD, b""),
                        f"delivered {deliveries[r.entry_id]} "
                        f"times without an ack (max_deliveries={self.max_deliveries})",
                    )
                    for r in over
                ]
            )
        return [r for r in raws if r not in over]

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        async def query() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for eid in entry_ids:
                    pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
                return await pipe.execute()

        replies = await self.retry.run(query, f"XPENDING {self.stream}")
        return {eid: int(rows[0]["times_delivered"]) for eid, rows in zip(entry_ids, replies, strict=True) if rows}

    async def _accept(self, raws: list[_Raw]) -> list[Entry[T]]:
        """Decode; dead-letter the undecodable; ack-and-skip duplicates; hold the rest."""
        out: list[Entry[T]] = []
        dead: list[tuple[str, bytes, str]] = []
        duplicates: list[str] = []
        for raw in raws:
            try:
                payload = raw.fields.get(PAYLOAD)
                if payload is None:
                    raise RecordError(f"entry has no {PAYLOAD.decode()!r} field (fields: {sorted(raw.fields)})")
                value = self.decode(payload)
            except (RecordError, ValueError, TypeError) as exc:
                dead.append((raw.entry_id, raw.fields.get(PAYLOAD, b""), f"{type(exc).__name__}: {exc}"))
                continue
            key = self.key_of(value) if self.key_of else None
            if key is not None and key in self.seen:
                duplicates.append(raw.entry_id)
                continue
            if key is not None:
                self.seen.add(key)
                self._held_by_key[key] = raw.entry_id
            self.held[raw.entry_id] = key
            out.append(Entry(raw.entry_id, value, key))
        if dead:
            await self.dead_letter(dead)
        if duplicates:
            self.stats.duplicates_skipped += len(duplicates)
            await self.ack(duplicates)
        return out

    async def dead_letter(self, items: Sequence[tuple[str, bytes, str]]) -> None:
        """Move entries `(entry_id, payload, reason)` to the dead stream, then ack and delete them (one MULTI)."""

        async def move() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry_id, payload, reason in items:
                    pipe.xadd(
                        self.dead_stream,
                        {
                            b"source": self.stream,
                            b"entry_id": entry_id,
                            b"reason": reason[:DEAD_REASON_MAX_CHARS],
                            b"consumer": self.consumer,
                            # At most DEAD_PAYLOAD_MAX_BYTES of the payload, so the stream is bounded in bytes
                            # (about dead_maxlen x 66 KiB) as well as in entries.
                            PAYLOAD: payload[:DEAD_PAYLOAD_MAX_BYTES],
                            b"truncated": b"1" if len(payload) > DEAD_PAYLOAD_MAX_BYTES else b"0",
                            b"payload_bytes": len(payload),
                        },
                        maxlen=self.dead_maxlen,
                        approximate=True,
                    )
                self.queue_ack(pipe, [entry_id for entry_id, _, _ in items])
                await pipe.execute()

        await self.retry.run(move, f"XADD {self.dead_stream}")
        self.stats.dead_lettered += len(items)
        self.mark_acked([entry_id for entry_id, _, _ in items])
        for entry_id, _, reason in items:
            log.warning("dead-lettered %s %s: %s", self.stream, entry_id, reason)

    def queue_ack(self, pipe: Any, entry_ids: Sequence[str]) -> None:
        """Add XACK + XDEL of `entry_ids` to a pipeline (used to ack atomically with other writes)."""
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)

    def mark_acked(self, entry_ids: Iterable[str]) -> None:
        """Entries acked outside `ack` (in a caller's MULTI): no longer held; their keys stay seen."""
        for entry_id in entry_ids:
            self._unhold(entry_id)

    def release(self, entry_ids: Iterable[str]) -> None:
        """Give entries back without acking (their work failed): they stay pending, are reclaimed after
        `claim_idle_ms` (by this consumer too) and are not treated as duplicates then."""
        for entry_id in entry_ids:
            key = self._unhold(entry_id)
            if key is not None:
                self.seen.discard(key)

    def _unhold(self, entry_id: str) -> str | None:
        key = self.held.pop(entry_id, None)
        if key is not None and self._held_by_key.get(key) == entry_id:
            del self._held_by_key[key]
        return key

    def held_entry_ids(self, keys: Iterable[str]) -> list[str]:
        """Entry ids of the held entries with these dedupe keys (keys not held are left out)."""
        return [self._held_by_key[k] for k in keys if k in self._held_by_key]

    async def ack_keys(self, keys: Iterable[str]) -> int:
        """Acknowledge the held entries with these dedupe keys (e.g. the rollout ids a committed checkpoint
        used); returns how many were still pending."""
        return await self.ack(self.held_entry_ids(keys))

    async def ack(self, entry_ids: Sequence[str]) -> int:
        """Acknowledge (and delete) entries; returns how many were still pending. Idempotent."""
        if not entry_ids:
            return 0

        async def ack() -> int:
            async with self.redis.pipeline(transaction=True) as pipe:
                self.queue_ack(pipe, entry_ids)
                acked, _ = await pipe.execute()
            return int(acked)

        acked = await self.retry.run(ack, f"XACK {self.stream} x{len(entry_ids)}")
        self.mark_acked(entry_ids)
        return acked

    async def keepalive(self) -> None:
        """Reset the idle time of held entries, so long holds (until a checkpoint) are not reclaimed."""
        held = sorted(self.held)
        for i in range(0, len(held), 1000):
            chunk: list[StreamIdT] = list(held[i : i + 1000])  # redis-py's list type is invariant

            async def claim(chunk: list[StreamIdT] = chunk) -> Any:
                return await self.redis.xclaim(self.stream, self.group, self.consumer, 0, chunk, justid=True)

            await self.retry.run(claim, f"XCLAIM {self.stream}")


def sample_key(record: RolloutRecord) -> str:
    """`{prompt_id}/{sample index}`: what "trained exactly once" is counted by. The sample index is the integer
    after the rollout id's last `/` (workers name rollouts `{prompt_id}@{prompt entry id}/{sample}`), else
    `meta["sample_index"]`; a copy of a prompt fed twice has new rollout ids but the same keys."""
    index = record.rollout_id.rpartition("/")[2]
    if not index.isdigit():
        index = str(record.meta.get("sample_index", ""))
    if not index.isdigit():
        raise RecordError(
            f"rollout {record.rollout_id!r}: no sample index (rollout ids end in /<sample>, or set meta.sample_index)"
        )
    return f"{record.prompt_id}/{int(index)}"


def _decode_rollout(payload: bytes) -> RolloutRecord:
    record = RolloutRecord.decode(payload)
    sample_key(record)  # a record without a sample index is refused here, so it is dead-lettered
    return record


def rollout_consumer(
    redis: aioredis.Redis,
    namespace: str,
    name: str,
    *,
    used_ids: Iterable[str] = (),
    seen: SeenSet | None = None,
    claim_idle_ms: int = 600_000,
    retry: RedisRetry | None = None,
) -> StreamConsumer[RolloutRecord]:
    """The trainer's reader of `{ns}:rollouts`: dedupe by `sample_key` (prompt id, sample index), keeping the
    first, seeded with the keys a checkpoint used (`used_ids`), in `seen` when the caller keeps the set. Ack
    entries only after the checkpoint that used them is committed; call `keepalive()` more often than
    `claim_idle_ms` while holding them."""
    keys = StreamKeys(namespace)
    return StreamConsumer(
        redis,
        keys.rollouts,
        ROLLOUT_GROUP,
        name,
        decode=_decode_rollout,
        dead_stream=keys.dead,
        key_of=sample_key,
        seen=seen if seen is not None else SeenSet(initial=used_ids),
        claim_idle_ms=claim_idle_ms,
        retry=retry,
    )
