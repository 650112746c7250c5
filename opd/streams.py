"""The Redis Streams transport shared by the rollout workers and the trainer: connection and producer side.

Owns: the connection (password and TLS URLs, or a password file), the namespaced key names, retry
with backoff on connection loss (and the transport's counters, `StreamStats`,
which `opd.stream_metrics` exports), consumer groups, the producer with
backpressure, and reading the dead-letter stream. The consumer side (reading
as a group member, acks, reclaim, dedupe) is `opd.stream_consumer`; policy
announcements are `opd.policy`. Delivery is at-least-once: an entry stays
pending until its consumer acks it (the trainer acks only after the
checkpoint that used it is committed), and an acked entry is deleted from the
stream, so `XLEN - pending` is the number of entries not yet delivered.

Does not know what the payloads mean (`protos.records` does). All calls are
asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from pydantic import Field, field_validator, model_validator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from opd.config import ConfigError, ConfigModel
from opd.redaction import SECRET_URL
from opd.retry import Backoff, RetryLog, retry_async

if TYPE_CHECKING:
    from opd.stream_consumer import StreamConsumer

log = logging.getLogger(__name__)
T = TypeVar("T")
PAYLOAD = b"d"  # the one field of every entry: the msgpack record
PROMPT_GROUP = "rollout-workers"  # consumer group of {ns}:prompts (all rollout workers)
ROLLOUT_GROUP = "trainer"  # consumer group of {ns}:rollouts


class RedisConfig(ConfigModel):
    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL: redis://[user:password@]host:port/db, "
        "rediss:// for TLS, unix:///path.sock (put secrets in the env variable or password_file, not a preset)",
        json_schema_extra=SECRET_URL,
    )
    password_file: str | None = Field(
        default=None,
        description="file holding the Redis password (e.g. a mounted Secret), read at connect; "
        "the URL then carries no password (a user name in it selects an ACL user)",
    )
    namespace: str = Field(
        default="opd",
        pattern=r"^[A-Za-z0-9_.{}\-]+$",
        description="key prefix: streams are "
        "{ns}:prompts, {ns}:rollouts, {ns}:dead; several students can share one Redis",
    )
    tls_ca_file: str | None = Field(default=None, description="rediss://: CA bundle to verify the server with")
    tls_cert_file: str | None = Field(default=None, description="rediss://: client certificate (mutual TLS)")
    tls_key_file: str | None = Field(default=None, description="rediss://: client private key (mutual TLS)")
    tls_verify: bool = Field(default=True, description="rediss://: verify the server certificate")
    socket_timeout_s: float = Field(default=30.0, gt=0, description="socket read timeout; must exceed block_ms")
    retry_for_s: float = Field(default=300.0, gt=0, description="keep retrying a lost connection this long, then fail")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return url

    @model_validator(mode="after")
    def _one_password(self) -> RedisConfig:
        if self.password_file and urlsplit(self.url).password:
            raise ValueError("redis.url holds a password and redis.password_file is set: keep only one of them")
        return self


def read_password_file(path: str) -> str:
    """The password in `path` (one trailing newline dropped); ConfigError naming the option, never the content."""
    try:
        password = Path(path).read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"redis.password_file {path!r} cannot be read: {reason}") from None
    if not password:
        raise ConfigError(f"redis.password_file {path!r} is empty; write the Redis password into it")
    return password


def connect(config: RedisConfig) -> aioredis.Redis:
    """A client for `config.url` (no I/O yet). Retries are owned by `RedisRetry`, not redis-py."""
    kwargs: dict[str, Any] = {
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.password_file:
        kwargs["password"] = read_password_file(config.password_file)
    if config.url.startswith("rediss://"):
        kwargs.update(
            ssl_ca_certs=config.tls_ca_file,
            ssl_certfile=config.tls_cert_file,
            ssl_keyfile=config.tls_key_file,
            ssl_cert_reqs="required" if config.tls_verify else "none",
        )
    return aioredis.from_url(config.url, **kwargs)


def redis_address(url: str) -> str:
    """`url` without its credentials, for logs (`redis://:secret@host:6379/0` -> `redis://host:6379/0`)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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
    """Runs idempotent Redis operations, retrying connection loss with capped backoff for `retry_for_s`.

    Every retry counts in `stats.retries` and is reported by `note_retry`: a WARNING naming `address`, the
    command, the attempt and the next delay, at most once per 10 s (`opd.retry.RetryLog`).
    """

    def __init__(
        self,
        retry_for_s: float = 300.0,
        backoff: Backoff = _RECONNECT_BACKOFF,
        stats: StreamStats | None = None,
        address: str = "redis",
    ) -> None:
        self.retry_for_s, self.backoff, self.address = retry_for_s, backoff, address
        self.stats = stats if stats is not None else StreamStats()
        self.log = RetryLog(log, "redis")

    def note_retry(self, what: str, attempt: int, exc: BaseException, delay_s: float) -> None:
        """Count and report one retry of `what` (any Redis retry loop of the process reports here)."""
        self.stats.retries += 1
        self.log.note(self.address, attempt, delay_s, f"{what}: {type(exc).__name__}: {exc}", type(exc).__name__)

    def _on_retry(self, what: str) -> Callable[[int, BaseException, float], None]:
        def note(attempt: int, exc: BaseException, delay_s: float) -> None:
            self.note_retry(what, attempt, exc, delay_s)

        return note

    async def run(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        deadline = time.monotonic() + self.retry_for_s
        try:
            return await retry_async(
                op,
                retryable=is_retryable,
                backoff=self.backoff,
                max_attempts=None,
                deadline_s=deadline,
                on_retry=self._on_retry(what),
            )
        except rex.ResponseError as exc:
            raise StreamError(f"redis refused {what}: {exc}") from exc
        except BaseException as exc:
            if is_retryable(exc):
                raise StreamError(
                    f"redis unreachable for {self.retry_for_s:.0f} s during {what} ({exc}); check the "
                    f"Redis URL and that the server is up"
                ) from exc
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

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        *,
        max_pending: int | None = None,
        retry: RedisRetry | None = None,
        poll_s: tuple[float, float] = (0.02, 1.0),
    ) -> None:
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

    async def send_many(
        self, payloads: Sequence[bytes], *, then_ack: tuple[StreamConsumer, Sequence[str]] | None = None
    ) -> list[str]:
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
            return [r.decode() for r in replies[: len(payloads)]]

        ids = await self.retry.run(push, f"XADD {self.stream} x{len(payloads)}")
        if then_ack is not None:
            then_ack[0].mark_acked(then_ack[1])
        return ids

    async def send(self, payload: bytes) -> str:
        return (await self.send_many([payload]))[0]


def prompt_producer(
    redis: aioredis.Redis, namespace: str, *, max_pending: int = 1024, retry: RedisRetry | None = None
) -> StreamProducer:
    """The writer of `{ns}:prompts` (feed it with `opd.prompts.feed_prompts`)."""
    return StreamProducer(redis, StreamKeys(namespace).prompts, PROMPT_GROUP, max_pending=max_pending, retry=retry)


async def read_dead(redis: aioredis.Redis, keys: StreamKeys, count: int = 100) -> list[dict[str, bytes]]:
    """The oldest `count` dead-lettered entries for inspection: source, entry_id, reason, consumer, d (at most
    64 KiB of the payload), truncated (b"1" when d was cut) and payload_bytes (the original size)."""
    # redis-py types replies as bytes or str; opd's clients never decode responses (`connect`)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.dead, count=count))
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]
