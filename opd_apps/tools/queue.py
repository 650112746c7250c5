"""`opd queue`: the operator's side of the dead-letter stream `{ns}:dead`.

Consumers move an entry there when it cannot be decoded or rendered, or was
delivered more than `max_deliveries` times (`opd.stream_consumer`), with the
stream it came from, its entry id, the consumer and the reason. This command
lists those entries with their reasons (and a count per reason), and
requeues them (the same payload, appended again to the stream it came from)
or drops them, chosen by id (the dead-letter id or the original entry id), by
a text in the reason, or all of one source. `--dry-run` prints what would
happen and changes nothing.

A requeued payload must be whole (consumers keep only the head of a very
large one) and still decode (it would only be dead-lettered again): one that
is not is left in place and reported, and the command exits 1.
Each requeue is one MULTI (append to the source, delete from `{ns}:dead`), so
an entry is never in both streams nor lost. Does not start a consumer or
decode anything beyond that check.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
import redis.exceptions as rex
from pydantic import Field

from opd.config import ConfigError, ConfigModel, load_config
from opd.streams import PAYLOAD, RedisConfig, RedisRetry, StreamError, StreamKeys, connect, redis_address
from protos.records import PromptRecord, RecordError, RolloutRecord

ACTIONS = {
    "list": "show dead letters with their reasons (newest last) and a count per reason",
    "requeue": "append the selected dead letters' payloads to the streams they came from, then delete them",
    "drop": "delete the selected dead letters",
}
DESCRIPTION = (
    "Inspect and act on the dead-letter stream {ns}:dead (prompts and rollouts a consumer gave up on). "
    "Select entries with --ids, --reason, --source or --all; requeue and drop need at least one of --ids, "
    "--reason or --all. --dry-run changes nothing. Options come from --config YAML < OPD_QUEUE__* env < flags."
)
_PAGE = 1000  # XRANGE page size
_CHUNK = 500  # entries per MULTI


class QueueCommandConfig(ConfigModel):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    source: Literal["all", "prompts", "rollouts"] = Field(default="all", description="dead letters from which stream")
    ids: list[str] = Field(
        default_factory=list, description="dead-letter ids or the original entry ids (either one) to select"
    )
    reason: str | None = Field(default=None, description="select entries whose reason contains this text (any case)")
    all: bool = Field(default=False, description="requeue / drop every dead letter of --source")
    dry_run: bool = Field(default=False, description="requeue / drop: print what would be done, change nothing")
    limit: int = Field(
        default=50, ge=0, description="list: entries printed, newest last (0 = all); the summary counts all"
    )
    retry_for_s: float = Field(default=10.0, gt=0, description="give up when Redis stays unreachable this long")


@dataclass(frozen=True)
class DeadLetter:
    dead_id: str  # id in {ns}:dead
    source: str  # the stream key it came from
    entry_id: str  # its id there
    consumer: str
    reason: str
    payload: bytes
    truncated: bool = False  # the consumer kept only the head of a large payload (`payload_bytes` in all)
    payload_bytes: int = 0


def reason_kind(reason: str) -> str:
    """The reason with its numbers replaced by N, so that "delivered 4 times" and "5 times" count together."""
    return re.sub(r"\d+", "N", reason)


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields.get(name.encode(), b"").decode("utf-8", "replace")


async def read_dead_letters(redis: aioredis.Redis, retry: RedisRetry, keys: StreamKeys) -> list[DeadLetter]:
    """Every entry of `{ns}:dead`, oldest first."""
    out: list[DeadLetter] = []
    start = "-"
    while True:

        async def page(start: str = start) -> list[tuple[bytes, dict[bytes, bytes]]]:
            # a client without decode_responses: entry ids and fields are bytes (redis-py types them loosely)
            return cast(
                list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.dead, min=start, max="+", count=_PAGE)
            )

        entries = await retry.run(page, f"XRANGE {keys.dead}")
        for raw_id, fields in entries:
            dead_id = raw_id.decode()
            out.append(
                DeadLetter(
                    dead_id,
                    _text(fields, "source"),
                    _text(fields, "entry_id"),
                    _text(fields, "consumer"),
                    _text(fields, "reason"),
                    fields.get(PAYLOAD, b""),
                    truncated=fields.get(b"truncated") == b"1",
                    payload_bytes=int(fields.get(b"payload_bytes") or len(fields.get(PAYLOAD, b""))),
                )
            )
        if len(entries) < _PAGE:
            return out
        start = "(" + out[-1].dead_id  # exclusive: the next page starts after the last entry read


def select(letters: Sequence[DeadLetter], config: QueueCommandConfig, keys: StreamKeys) -> list[DeadLetter]:
    """The dead letters the options name: of `source`, and matching `ids` and `reason` when given."""
    sources = {"prompts": {keys.prompts}, "rollouts": {keys.rollouts}}.get(config.source)
    ids, reason = set(config.ids), (config.reason or "").lower()
    return [
        d
        for d in letters
        if (sources is None or d.source in sources)
        and (not ids or d.dead_id in ids or d.entry_id in ids)
        and reason in d.reason.lower()
    ]


def _decoder(source: str, keys: StreamKeys) -> Callable[[bytes], object] | None:
    return {keys.prompts: PromptRecord.decode, keys.rollouts: RolloutRecord.decode}.get(source)


def why_not_requeueable(letter: DeadLetter, keys: StreamKeys) -> str | None:
    """None when `letter` can go back to its stream, else why not."""
    decode = _decoder(letter.source, keys)
    if decode is None:
        return f"its source {letter.source!r} is not {keys.prompts} or {keys.rollouts} of this namespace"
    if letter.truncated:
        return f"only the first {len(letter.payload)} of its {letter.payload_bytes} payload bytes were kept"
    try:
        decode(letter.payload)
    except (RecordError, ValueError, TypeError) as exc:
        return f"its payload does not decode ({type(exc).__name__}: {exc}); it would only be dead-lettered again"
    return None


async def requeue(redis: aioredis.Redis, retry: RedisRetry, keys: StreamKeys, letters: Sequence[DeadLetter]) -> None:
    """Append each payload to its source and delete it from `{ns}:dead`, in one MULTI per chunk."""
    for i in range(0, len(letters), _CHUNK):
        chunk = letters[i : i + _CHUNK]

        async def move(chunk: Sequence[DeadLetter] = chunk) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                for letter in chunk:
                    pipe.xadd(letter.source, {PAYLOAD: letter.payload})
                pipe.xdel(keys.dead, *[letter.dead_id for letter in chunk])
                await pipe.execute()

        try:
            await move()  # not retried: a MULTI whose reply was lost may have run, and would append twice
        except (ConnectionError, rex.ConnectionError, rex.TimeoutError) as exc:
            done = ", ".join(letter.dead_id for letter in letters[:i]) or "none"
            raise StreamError(
                f"lost Redis while requeueing dead letters {chunk[0].dead_id}..{chunk[-1].dead_id} ({exc}); "
                f"they may or may not have moved: run `opd queue list` before retrying (moved before: {done})"
            ) from exc


async def drop(redis: aioredis.Redis, retry: RedisRetry, keys: StreamKeys, letters: Sequence[DeadLetter]) -> None:
    """Delete the dead letters (XDEL is idempotent, so it is retried)."""
    for i in range(0, len(letters), _CHUNK):
        ids = [letter.dead_id for letter in letters[i : i + _CHUNK]]

        async def delete(ids: list[str] = ids) -> int:
            return await redis.xdel(keys.dead, *ids)

        await retry.run(delete, f"XDEL {keys.dead} x{len(ids)}")


# -- the command ---------------------------------------------------------------------------------


def _short(source: str, keys: StreamKeys) -> str:
    return {keys.prompts: "prompts", keys.rollouts: "rollouts"}.get(source, source)


def print_list(letters: Sequence[DeadLetter], selected: Sequence[DeadLetter], keys: StreamKeys, limit: int) -> None:
    by_source = Counter(_short(d.source, keys) for d in letters)
    counts = ", ".join(f"{name} {n}" for name, n in sorted(by_source.items())) or "empty"
    print(f"{keys.dead}: {len(letters)} dead letters ({counts}); {len(selected)} selected")
    if not selected:
        return
    print("reasons:")
    for kind, n in Counter(reason_kind(d.reason) for d in selected).most_common():
        print(f"  {n:6d}  {kind}")
    shown = selected[-limit:] if limit else selected
    if len(shown) < len(selected):
        print(f"last {len(shown)} of {len(selected)} (--limit 0 shows all):")
    print(f"  {'DEAD ID':<20} {'SOURCE':<9} {'ENTRY ID':<20} {'CONSUMER':<16} REASON")
    for d in shown:
        print(f"  {d.dead_id:<20} {_short(d.source, keys):<9} {d.entry_id:<20} {d.consumer:<16} {d.reason}")


def _check_selection(action: str, config: QueueCommandConfig) -> None:
    if action != "list" and not (config.ids or config.reason or config.all):
        raise ConfigError(
            f"`opd queue {action}` needs a selection: --ids ID [ID ...], --reason TEXT, or --all "
            f"(with --source prompts|rollouts to limit it); `opd queue list` shows the ids and reasons"
        )


async def run(action: str, config: QueueCommandConfig) -> int:
    """List, requeue or drop; 0 on success, 1 when some selected entries could not be requeued."""
    keys = StreamKeys(config.redis.namespace)
    retry = RedisRetry(config.retry_for_s, address=redis_address(config.redis.url))
    redis = connect(config.redis)
    try:
        letters = await read_dead_letters(redis, retry, keys)
        selected = select(letters, config, keys)
        if action == "list":
            print_list(letters, selected, keys, config.limit)
            return 0
        blocked = {d.dead_id: why for d in selected if action == "requeue" and (why := why_not_requeueable(d, keys))}
        todo = [d for d in selected if d.dead_id not in blocked]
        would = "would " if config.dry_run else ""
        for d in todo:
            where = f" to {d.source}" if action == "requeue" else ""
            print(f"{would}{action} {d.dead_id} ({_short(d.source, keys)} entry {d.entry_id}){where}")
        for dead_id, why in blocked.items():
            print(f"not requeued: {dead_id}: {why} (`opd queue drop --ids {dead_id}` removes it)")
        if not config.dry_run and todo:
            await (requeue if action == "requeue" else drop)(redis, retry, keys, todo)
        print(f"{would}{action} {len(todo)} of {len(selected)} selected dead letters{' (dry run)' if would else ''}")
        return 1 if blocked else 0
    finally:
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: opd queue {list,requeue,drop} [options]\n\n" + "\n".join(
        f"  {name:<8} {text}" for name, text in ACTIONS.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{usage}\n\n`opd queue <action> --help` lists the options.")
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    if action not in ACTIONS:
        print(f"opd queue: unknown action {action!r}\n\n{usage}", file=sys.stderr)
        return 2
    try:
        config = load_config(
            QueueCommandConfig, rest, prog=f"opd queue {action}", description=DESCRIPTION, env_prefix="OPD_QUEUE__"
        )
        _check_selection(action, config)
        return asyncio.run(run(action, config))
    except (ConfigError, StreamError) as exc:
        print(f"opd queue: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
