"""The Redis Streams transport shared by the rollout workers and the trainer.

Owns: the connection (password and TLS URLs), the namespaced key names, retry
with backoff on connection loss, the producer with backpressure, the consumer
group reader with explicit acknowledgement, reclaiming of entries a dead
consumer left pending (XAUTOCLAIM), the dead-letter stream, dedupe by record
id, and the policy announcement hash + channel. Delivery is at-least-once:
an entry stays pending until its consumer acks it (the trainer acks only after
the checkpoint that used it is committed), and an acked entry is deleted from
the stream, so `XLEN - pending` is the number of entries not yet delivered.

Does not know what the payloads mean: callers pass a decoder (`protos.records`)
and a function that names a record's dedupe key. All calls are asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex
from pydantic import Field, field_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from opd.config import ConfigModel
from opd.retry import Backoff, retry_async
from protos.records import PolicyAnnouncement, RecordError, RolloutRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
PAYLOAD = b"d"  # the one field of every entry: the msgpack record
PROMPT_GROUP = "rollout-workers"  # consumer group of {ns}:prompts (all rollout workers)
ROLLOUT_GROUP = "trainer"  # consumer group of {ns}:rollouts


class RedisConfig(ConfigModel):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL: redis://[user:password@]host:port/db, "
                     "rediss:// for TLS, unix:///path.sock (put secrets in the env variable, not a preset)")
    namespace: str = Field("opd", pattern=r"^[A-Za-z0-9_.{}\-]+$", description="key prefix: streams are "
                           "{ns}:prompts, {ns}:rollouts, {ns}:dead; several students can share one Redis")
    tls_ca_file: str | None = Field(None, description="rediss://: CA bundle to verify the server with")
    tls_cert_file: str | None = Field(None, description="rediss://: client certificate (mutual TLS)")
    tls_key_file: str | None = Field(None, description="rediss://: client private key (mutual TLS)")
    tls_verify: bool = Field(True, description="rediss://: verify the server certificate")
    socket_timeout_s: float = Field(30.0, gt=0, description="socket read timeout; must exceed block_ms")
    retry_for_s: float = Field(300.0, gt=0, description="keep retrying a lost connection this long, then fail")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return url


def connect(config: RedisConfig) -> aioredis.Redis:
    """A client for `config.url` (no I/O yet). Retries are owned by `RedisRetry`, not redis-py."""
    kwargs: dict[str, Any] = {"socket_timeout": config.socket_timeout_s, "socket_connect_timeout": 5.0,
                              "health_check_interval": 30, "retry": Retry(NoBackoff(), 0)}
    if config.url.startswith("rediss://"):
        kwargs.update(ssl_ca_certs=config.tls_ca_file, ssl_certfile=config.tls_cert_file,
                      ssl_keyfile=config.tls_key_file, ssl_cert_reqs="required" if config.tls_verify else "none")
    return aioredis.from_url(config.url, **kwargs)


@dataclass(frozen=True)
class StreamKeys:
    """Every key of one namespace."""

    namespace: str = "opd"

    @property
    def prompts(self) -> str:
        return f"{self.namespace}:prompts"

    @property
    def rollouts(self) -> str:
        return f"{self.namespace}:rollouts"

    @property
    def dead(self) -> str:
        return f"{self.namespace}:dead"

    @property
    def feeder(self) -> str:
        """Set (with a TTL) while a prompt feeder is still adding prompts."""
        return f"{self.namespace}:prompts:feeder"

    @property
    def policy(self) -> str:
        return f"{self.namespace}:policy"

    @property
    def policy_events(self) -> str:
        return f"{self.namespace}:policy:events"


class StreamError(RuntimeError):
    """Redis stayed unreachable past `retry_for_s`, or refused a command; the message says which."""


def is_retryable(exc: BaseException) -> bool:
    """Connection loss, timeouts and a server still loading; never auth failures or command errors."""
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return False
    return isinstance(exc, rex.ConnectionError | rex.TimeoutError | rex.BusyLoadingError | ConnectionError)


@dataclass
class StreamStats:
    """Counters filled by producers and consumers; exported by the component's metrics layer."""

    retries: int = 0
    dead_lettered: int = 0
    duplicates_skipped: int = 0
    reclaimed: int = 0
    backpressure_wait_s: float = 0.0


_RECONNECT_BACKOFF = Backoff(initial_s=0.05, max_s=2.0)


class RedisRetry:
    """Runs idempotent Redis operations, retrying connection loss with capped backoff for `retry_for_s`."""

    def __init__(self, retry_for_s: float = 300.0, backoff: Backoff = _RECONNECT_BACKOFF,
                 stats: StreamStats | None = None) -> None:
        self.retry_for_s, self.backoff = retry_for_s, backoff
        self.stats = stats if stats is not None else StreamStats()

    def _on_retry(self, what: str) -> Callable[[int, BaseException, float], None]:
        def note(attempt: int, exc: BaseException, delay_s: float) -> None:
            self.stats.retries += 1
            log.warning("redis %s failed (%s: %s); retry %d in %.2f s", what, type(exc).__name__, exc, attempt, delay_s)
        return note

    async def run(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        deadline = time.monotonic() + self.retry_for_s
        try:
            return await retry_async(op, retryable=is_retryable, backoff=self.backoff, max_attempts=None,
                                     deadline_s=deadline, on_retry=self._on_retry(what))
        except rex.ResponseError as exc:
            raise StreamError(f"redis refused {what}: {exc}") from exc
        except BaseException as exc:
            if is_retryable(exc):
                raise StreamError(f"redis unreachable for {self.retry_for_s:.0f} s during {what} ({exc}); check the "
                                  f"Redis URL and that the server is up") from exc
            raise


async def ensure_group(redis: aioredis.Redis, retry: RedisRetry, stream: str, group: str) -> None:
    """Create `group` on `stream` (and the stream) reading from the start; a no-op when it exists."""
    async def create() -> None:
        try:
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    await retry.run(create, f"XGROUP CREATE {stream} {group}")


async def undelivered(redis: aioredis.Redis, retry: RedisRetry, stream: str, group: str) -> int:
    """Entries not yet delivered to `group` (acked entries are deleted, so XLEN - pending)."""
    async def count() -> int:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xpending(stream, group)
            length, pending = await pipe.execute()
        return max(0, int(length) - int(pending["pending"]))
    return await retry.run(count, f"XLEN {stream}")


class StreamProducer:
    """Appends payloads to one stream; with `max_pending`, waits while more than that many are undelivered."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, *, max_pending: int | None = None,
                 retry: RedisRetry | None = None, poll_s: tuple[float, float] = (0.02, 1.0)) -> None:
        self.redis, self.stream, self.group, self.max_pending = redis, stream, group, max_pending
        self.retry = retry or RedisRetry()
        self._poll = Backoff(initial_s=poll_s[0], max_s=poll_s[1], multiplier=1.5, jitter=0.2)
        self._group_ready = False

    async def _ensure(self) -> None:
        if not self._group_ready:
            await ensure_group(self.redis, self.retry, self.stream, self.group)
            self._group_ready = True

    async def wait_for_room(self, n: int = 1) -> float:
        """Block until `n` more entries fit under `max_pending`; returns seconds waited."""
        await self._ensure()
        if self.max_pending is None:
            return 0.0
        start, attempt = time.monotonic(), 0
        while await undelivered(self.redis, self.retry, self.stream, self.group) + n > max(self.max_pending, n):
            attempt += 1
            await asyncio.sleep(self._poll.delay_s(attempt))
        waited = time.monotonic() - start
        self.retry.stats.backpressure_wait_s += waited
        return waited

    async def send_many(self, payloads: Sequence[bytes], *,
                        then_ack: tuple[StreamConsumer, Sequence[str]] | None = None) -> list[str]:
        """Append payloads in one MULTI; `then_ack=(consumer, entry_ids)` acks those entries in the same MULTI.

        A retried MULTI whose first reply was lost may append twice: consumers dedupe by record id.
        """
        await self.wait_for_room(len(payloads))

        async def push() -> list[str]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for payload in payloads:
                    pipe.xadd(self.stream, {PAYLOAD: payload})
                if then_ack is not None and then_ack[1]:
                    then_ack[0].queue_ack(pipe, then_ack[1])
                replies = await pipe.execute()
            return [r.decode() for r in replies[:len(payloads)]]
        ids = await self.retry.run(push, f"XADD {self.stream} x{len(payloads)}")
        if then_ack is not None:
            then_ack[0].mark_acked(then_ack[1])
        return ids

    async def send(self, payload: bytes) -> str:
        return (await self.send_many([payload]))[0]


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
    name), then periodically reclaims entries idle for `claim_idle_ms` in other
    consumers (XAUTOCLAIM), then reads new ones. Entries that fail to decode, or
    were delivered more than `max_deliveries` times, go to `dead_stream` with
    the reason and are acked. With `key_of`, an entry whose key is in `seen`
    (already used; seed it from a checkpoint) is acked and skipped. An entry
    whose work failed is handed back with `release` (retried later, up to
    `max_deliveries`); `keepalive` keeps long-held entries from being reclaimed.
    """

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str, *,
                 decode: Callable[[bytes], T], dead_stream: str, key_of: Callable[[T], str] | None = None,
                 seen: SeenSet | None = None, claim_idle_ms: int = 60_000, max_deliveries: int = 5,
                 retry: RedisRetry | None = None, dead_maxlen: int = 100_000) -> None:
        self.redis, self.stream, self.group, self.consumer = redis, stream, group, consumer
        self.decode, self.key_of, self.dead_stream = decode, key_of, dead_stream
        self.seen = seen if seen is not None else SeenSet()
        self.claim_idle_ms, self.max_deliveries, self.dead_maxlen = claim_idle_ms, max_deliveries, dead_maxlen
        self.retry = retry or RedisRetry()
        self.held: dict[str, str | None] = {}  # entry id -> dedupe key, for entries read and not yet acked
        self._backlog_cursor: str | None = "0"  # entries pending under our name from an earlier run come first
        self._claim_cursor, self._next_claim = "0-0", 0.0
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
        if len(raws) < count and time.monotonic() >= self._next_claim:
            raws += await self._reclaim(count - len(raws))
        if len(raws) < count:
            raws += await self._xreadgroup(">", count - len(raws), None if raws else block_ms)
        return await self._accept(raws)

    async def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[_Raw]:
        async def read() -> Any:
            return await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count,
                                               block=block_ms)
        reply = await self.retry.run(read, f"XREADGROUP {self.stream}")
        entries = reply[0][1] if reply else []
        return [_Raw(eid.decode(), fields or {}) for eid, fields in entries]

    async def _reclaim(self, count: int) -> list[_Raw]:
        """XAUTOCLAIM entries idle past `claim_idle_ms`; the over-delivered ones go to the dead stream."""
        async def claim() -> Any:
            return await self.redis.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                               start_id=self._claim_cursor, count=count)
        cursor, entries, *_ = await self.retry.run(claim, f"XAUTOCLAIM {self.stream}")
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":  # one full pass done: wait before scanning again
            self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        raws = [_Raw(eid.decode(), fields or {}) for eid, fields in entries if eid.decode() not in self.held]
        if not raws:
            return []
        self.stats.reclaimed += len(raws)
        log.info("reclaimed %d entries of %s idle > %d ms", len(raws), self.stream, self.claim_idle_ms)
        deliveries = await self._delivery_counts([r.entry_id for r in raws])
        over = [r for r in raws if deliveries.get(r.entry_id, 0) > self.max_deliveries]
        if over:
            await self.dead_letter([(r.entry_id, r.fields.get(PAYLOAD, b""), f"delivered {deliveries[r.entry_id]} "
                                     f"times without an ack (max_deliveries={self.max_deliveries})") for r in over])
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
                    pipe.xadd(self.dead_stream, {b"source": self.stream, b"entry_id": entry_id,
                                                 b"reason": reason[:2000], b"consumer": self.consumer,
                                                 PAYLOAD: payload}, maxlen=self.dead_maxlen, approximate=True)
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
            self.held.pop(entry_id, None)

    def release(self, entry_ids: Iterable[str]) -> None:
        """Give entries back without acking (their work failed): they stay pending, are reclaimed after
        `claim_idle_ms` (by this consumer too) and are not treated as duplicates then."""
        for entry_id in entry_ids:
            key = self.held.pop(entry_id, None)
            if key is not None:
                self.seen.discard(key)

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
            chunk = held[i:i + 1000]

            async def claim(chunk: list[str] = chunk) -> Any:
                return await self.redis.xclaim(self.stream, self.group, self.consumer, 0, chunk, justid=True)
            await self.retry.run(claim, f"XCLAIM {self.stream}")


def rollout_consumer(redis: aioredis.Redis, namespace: str, name: str, *, used_ids: Iterable[str] = (),
                     claim_idle_ms: int = 600_000, retry: RedisRetry | None = None) -> StreamConsumer[RolloutRecord]:
    """The trainer's reader of `{ns}:rollouts`: dedupe by rollout id, seeded with the ids a checkpoint used.
    Ack entries only after the checkpoint that used them is committed; call `keepalive()` more often than
    `claim_idle_ms` while holding them."""
    keys = StreamKeys(namespace)
    return StreamConsumer(redis, keys.rollouts, ROLLOUT_GROUP, name, decode=RolloutRecord.decode,
                          dead_stream=keys.dead, key_of=lambda r: r.rollout_id, seen=SeenSet(initial=used_ids),
                          claim_idle_ms=claim_idle_ms, retry=retry)


def prompt_producer(redis: aioredis.Redis, namespace: str, *, max_pending: int = 1024,
                    retry: RedisRetry | None = None) -> StreamProducer:
    """The writer of `{ns}:prompts` (feed it with `opd.prompts.feed_prompts`)."""
    return StreamProducer(redis, StreamKeys(namespace).prompts, PROMPT_GROUP, max_pending=max_pending, retry=retry)


# ---------------------------------------------------------------------------------------------- policy announcements

_ANNOUNCE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'record', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


async def announce_policy(redis: aioredis.Redis, keys: StreamKeys, announcement: PolicyAnnouncement,
                          retry: RedisRetry | None = None) -> bool:
    """Store the announcement in `{ns}:policy` and publish it on `{ns}:policy:events`, unless a version at
    least as new is already there (returns False then). Atomic (one Lua script)."""
    payload = announcement.encode()

    async def run() -> int:
        return await redis.eval(_ANNOUNCE, 2, keys.policy, keys.policy_events, announcement.version, payload)
    return bool(await (retry or RedisRetry()).run(run, f"announce policy v{announcement.version}"))


async def read_policy(redis: aioredis.Redis, keys: StreamKeys,
                      retry: RedisRetry | None = None) -> PolicyAnnouncement | None:
    """The latest announcement, or None when no policy was announced in this namespace."""
    async def run() -> bytes | None:
        return await redis.hget(keys.policy, "record")
    payload = await (retry or RedisRetry()).run(run, f"HGET {keys.policy}")
    return None if payload is None else PolicyAnnouncement.decode(payload)


async def read_dead(redis: aioredis.Redis, keys: StreamKeys, count: int = 100) -> list[dict[str, bytes]]:
    """The oldest `count` dead-lettered entries (source, entry_id, reason, consumer, d) for inspection."""
    entries = await redis.xrange(keys.dead, count=count)
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]
