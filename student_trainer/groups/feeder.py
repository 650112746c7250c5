"""The trainer's prompt feeder (rank 0): the prompt file into `{ns}:prompts`, each prompt until it is trained or lost.

Owns feeding the training prompts, each admitted only while its group will be trained within the staleness
bound (`admission.Admission`: by the oldest live worker's loaded version, or the older in-flight count);
the `PromptLedger` of the prompts fed and not yet trained, which goes into every checkpoint; and what happens to a
prompt that will not produce a group. The feeder learns that from the dead-letter stream (`{ns}:dead`: a worker
dead-lettered the prompt, or the trainer one of its rollouts), from `group_timeout_s` (no whole group since it
was fed), from a restart (fed, not trained, and no longer anywhere in Redis) and from the trainer (its group went
stale). Such a prompt is fed again under the same id, up to `data.max_refeeds` times, then recorded as lost:
`opd_trainer_prompts_refed_total` / `opd_trainer_prompts_lost_total{reason}` and a line in
`{checkpoint.dir}/prompts.jsonl` (`event` refed or lost, `prompt_id`, `reason`, `detail`, `refeeds`, `time`).

At start-up (`start_up`) it counts what is already in Redis as in flight: the prompts in `{ns}:prompts` and the
prompts of the rollouts in `{ns}:rollouts` not yet trained (read in one MULTI, so a prompt moving from one stream
to the other is seen once), and does not feed those again. Runs on the trainer's I/O loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opd.stream_consumer import sample_key
from opd.streams import PAYLOAD
from protos.records import PromptRecord, RecordError, RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.groups.admission import Admission, oldest_live_version
from student_trainer.groups.ledger import FeedStats, Outcome, PromptLedger, Reason
from student_trainer.groups.source import RolloutSource

log = logging.getLogger(__name__)
_CHUNK = 16  # prompts per XADD MULTI
_VERSION_POLL_S = 0.05  # how often the heartbeats are read again while the workers' versions hold admission back


class PromptFeeder:
    def __init__(self, source: RolloutSource, config: TrainerConfig, records: list[PromptRecord]) -> None:
        data = config.data
        self.admission = Admission.from_config(config)
        self.max_inflight = self.admission.inflight_bound()  # the older rule's bound (admission=inflight)
        self.trainer_step = 0  # steps the trainer has done (set by the trainer's settlement)
        self.oldest_version: int | None = None  # the oldest live worker's loaded version, last read
        self.records = records
        self.position = 0  # index of the next prompt to feed; restored from a checkpoint
        self.ledger = PromptLedger(data.max_refeeds, data.group_timeout_s)
        self.stats = FeedStats()
        self._source, self._keys = source, source.keys
        self._index = {r.prompt_id: i for i, r in enumerate(records)}
        self._skip: set[str] = set()  # prompts a previous run fed beyond `position` that are still in Redis
        self._entry_prompt: dict[str, str] = {}  # `{ns}:prompts` entry id -> prompt id, for the dead-letter watch
        self._refeeds: list[str] = []
        self._lost: list[str] = []
        self._dead_cursor = "0-0"
        self._wake: asyncio.Event | None = None
        self._audit = Path(config.checkpoint.dir) / "prompts.jsonl"
        self.state = "starting"

    # -- what the trainer and the rollout source ask -------------------------------------------------------------

    def accepts(self, prompt_id: str) -> bool:
        """Whether a training rollout of `prompt_id` may join a group: not one of ours, or ours and still open."""
        return prompt_id not in self._index or self.ledger.accepts(prompt_id)

    def describe(self) -> str:
        if self.admission.rule == "version":
            bound = self.admission.untrained_bound(self.trainer_step, self.oldest_version)
            oldest = "none reported" if self.oldest_version is None else f"v{self.oldest_version}"
            admitted = (
                f"{len(self.ledger.open)} untrained of at most {bound} (trainer at step {self.trainer_step}, "
                f"oldest live worker {oldest})"
            )
        else:
            admitted = f"{self.ledger.inflight} of at most {self.max_inflight} in flight"
        return f"prompt feeder {self.state}: {admitted}, {self.position}/{len(self.records)} fed"

    def room(self) -> int:
        """How many more groups the admission rule lets in now."""
        return self.admission.room(
            untrained=len(self.ledger.open),
            inflight=self.ledger.inflight,
            trainer_step=self.trainer_step,
            oldest_version=self.oldest_version,
        )

    def checkpoint_state(self) -> dict[str, Any]:
        """The feeder's part of a checkpoint (call on the I/O loop, e.g. through `snapshot`)."""
        return {"position": self.position, **self.ledger.state()}

    async def snapshot(self) -> dict[str, Any]:
        return self.checkpoint_state()

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a checkpoint's position and ledger (before `start_up`)."""
        self.position = state["position"]
        self.ledger.restore(state, time.monotonic())

    async def on_taken(self, prompt_ids: Iterable[str]) -> None:
        """The trainer pulled these prompts' groups: no longer in flight."""
        for pid in prompt_ids:
            self.ledger.taken(pid)
        self._poke()

    async def on_trained(self, prompt_ids: Iterable[str]) -> None:
        for pid in prompt_ids:
            self.ledger.trained(pid)
        self._poke()

    async def on_stale(self, prompt_ids: Iterable[str]) -> None:
        """These prompts' groups were dropped as stale when their step trained: feed them again."""
        for pid in prompt_ids:
            self._fail(pid, "stale", "its group was sampled more than batch.max_staleness versions before training")

    # -- start-up: what is in Redis already ------------------------------------------------------------------------

    async def start_up(self, is_used: Callable[[str], bool]) -> None:
        """Count what a previous run left in Redis as in flight (`is_used(sample key)`: trained and committed)."""
        redis, keys = self._source.redis, self._keys

        async def read() -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xrange(keys.prompts)
                pipe.xrange(keys.rollouts)
                pipe.xrevrange(keys.dead, count=1)
                return await pipe.execute()

        prompt_entries, rollout_entries, last_dead = await self._source.retry.run(read, "XRANGE (prompts in flight)")
        queued: dict[str, str] = {}
        for entry_id, fields in prompt_entries:
            record = _decode(PromptRecord, fields)
            if record is not None and record.split == "train":
                queued[record.prompt_id] = entry_id.decode()
        sampled = set()
        for _, fields in rollout_entries:
            rollout = _decode(RolloutRecord, fields)
            if rollout is not None and rollout.split == "train" and not _used(rollout, is_used):
                sampled.add(rollout.prompt_id)
        self._dead_cursor = last_dead[0][0].decode() if last_dead else "0-0"
        self._reconcile(queued, sampled)

    def _reconcile(self, queued: dict[str, str], sampled: set[str]) -> None:
        now, present = time.monotonic(), set(queued) | sampled
        self._entry_prompt.update({entry: pid for pid, entry in queued.items()})
        for pid in list(self.ledger.open):
            if pid in present:
                self.ledger.fed(pid, queued.get(pid), now)
            else:
                self._fail(pid, "missing", "fed, not trained, and no longer in Redis at start-up")
        found = 0
        for pid in present:
            index = self._index.get(pid)
            if index is None or index < self.position or pid in self.ledger.open or pid in self.ledger.lost:
                continue
            self.ledger.fed(pid, queued.get(pid), now)
            self._skip.add(pid)
            found += 1
        log.info(
            "prompt feeder: %d prompts of this run in flight at start-up (%d fed after the checkpoint), "
            "%d to feed again; feeding from %d of %d",
            self.ledger.inflight,
            found,
            len(self._refeeds),
            self.position,
            len(self.records),
        )

    # -- the loop ---------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Feed to the end and until every prompt fed is trained or lost; watch dead letters and deadlines."""
        self._wake = asyncio.Event()
        while True:
            await self._watch_dead()
            self._check_deadlines()
            await self._send_refeeds()
            if self.admission.rule == "version":
                self.oldest_version = await oldest_live_version(
                    self._source.redis, self._source.retry, self._keys.prompts
                )
            if await self._feed_next():
                continue
            if self.position >= len(self.records) and not self.ledger.open:
                self.state = "done"
                log.info(
                    "prompt feeder: all %d prompts fed and trained (%d lost)", len(self.records), len(self.ledger.lost)
                )
                return
            self.state = "waiting for room" if self.position < len(self.records) else "all fed"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_s())

    def _idle_s(self) -> float:
        """How long to wait for a wake-up: short while the workers' versions hold admission back (a version
        loaded is only seen by reading the heartbeats again), else 1 s."""
        lagging = self.oldest_version is not None and self.oldest_version < self.trainer_step
        return _VERSION_POLL_S if self.admission.rule == "version" and lagging else 1.0

    async def _feed_next(self) -> bool:
        """Feed the next chunk if there is room; False when nothing could be fed."""
        room = min(self.room(), _CHUNK)
        chunk, cursor = [], self.position
        while cursor < len(self.records) and len(chunk) < room:
            record = self.records[cursor]
            cursor += 1
            pid = record.prompt_id
            if pid not in self._skip and pid not in self.ledger.open and pid not in self.ledger.lost:
                chunk.append(record)
        if cursor == self.position:
            return False
        self.state = "feeding"
        if chunk:
            # Open before the XADD: a worker can sample a prompt and the rollout source read its rollouts before
            # this coroutine resumes (the I/O loop runs both, and a busy step delays it), and a rollout of a
            # prompt that is not open is refused and acknowledged, never trained.
            now = time.monotonic()
            for record in chunk:
                self.ledger.fed(record.prompt_id, None, now)
            try:
                entry_ids = await self._source.prompts.send_many([r.encode() for r in chunk])
            except BaseException:
                for record in chunk:  # not fed (as far as we know): fed again by the next call
                    self.ledger.open.pop(record.prompt_id, None)
                raise
            for record, entry_id in zip(chunk, entry_ids, strict=True):
                if (opened := self.ledger.open.get(record.prompt_id)) is not None:
                    opened.entry_id = entry_id
                self._entry_prompt[entry_id] = record.prompt_id
        self.position = cursor
        return True

    async def _send_refeeds(self) -> None:
        pids = [pid for pid in dict.fromkeys(self._refeeds) if pid in self.ledger.open and pid in self._index]
        self._refeeds.clear()
        for pid in self._lost:
            await self._source.discard_partial(pid)
        self._lost.clear()
        if not pids:
            return
        entry_ids = await self._source.prompts.send_many([self.records[self._index[pid]].encode() for pid in pids])
        now = time.monotonic()
        for pid, entry_id in zip(pids, entry_ids, strict=True):
            self.ledger.fed(pid, entry_id, now)
            self._entry_prompt[entry_id] = pid

    def _check_deadlines(self) -> None:
        timeout = self.ledger.group_timeout_s
        for pid in self.ledger.overdue(time.monotonic()):
            self._fail(pid, "timeout", f"no whole group within data.group_timeout_s={timeout:g} s of feeding it")

    async def _watch_dead(self) -> None:
        """Read the dead-letter stream past the cursor: a prompt of ours, or a rollout of one, dead-lettered."""

        async def read() -> Any:
            return await self._source.redis.xread({self._keys.dead: self._dead_cursor}, count=100)

        for _, entries in await self._source.retry.run(read, f"XREAD {self._keys.dead}"):
            for entry_id, fields in entries:
                self._dead_cursor = entry_id.decode()
                self._on_dead(fields)

    def _on_dead(self, fields: dict[bytes, bytes]) -> None:
        source, entry = fields.get(b"source", b"").decode(), fields.get(b"entry_id", b"").decode()
        reason = fields.get(b"reason", b"").decode(errors="replace")
        if source == self._keys.prompts:
            record = _decode(PromptRecord, fields)
            pid = self._entry_prompt.get(entry) or (record.prompt_id if record is not None else None)
            open_ = self.ledger.open.get(pid) if pid else None
            if pid and open_ is not None and open_.entry_id in (None, entry):  # its latest copy, not an older one
                self._fail(pid, "dead_lettered", f"dead-lettered by a rollout worker: {reason}")
        elif source == self._keys.rollouts:
            rollout = _decode(RolloutRecord, fields)
            if rollout is not None and rollout.prompt_id in self.ledger.open:
                self._fail(rollout.prompt_id, "dead_lettered", f"a rollout of it was dead-lettered: {reason}")

    # -- refeed or lose -----------------------------------------------------------------------------------------------

    def _fail(self, prompt_id: str, reason: Reason, detail: str) -> None:
        if reason != "stale" and self._source.has_group(prompt_id):
            return  # another copy's whole group is in, waiting for a step: nothing to feed again
        outcome = self.ledger.failed(prompt_id, reason, detail)
        if outcome is None:
            return
        if outcome.action == "refeed":
            self.stats.refed[reason] += 1
            self._refeeds.append(prompt_id)
            log.warning(
                "prompt %s fed again (%d of %d): %s", prompt_id, outcome.refeeds, self.ledger.max_refeeds, detail
            )
        else:
            self.stats.lost[reason] += 1
            self._lost.append(prompt_id)
            log.error("prompt %s lost after %d refeeds: %s", prompt_id, outcome.refeeds, detail)
        self._write_audit(outcome)
        self._poke()

    def _write_audit(self, outcome: Outcome) -> None:
        line = {
            "time": time.time(),
            "event": "refed" if outcome.action == "refeed" else "lost",
            "prompt_id": outcome.prompt_id,
            "reason": outcome.reason,
            "detail": outcome.detail,
            "refeeds": outcome.refeeds,
        }
        self._audit.parent.mkdir(parents=True, exist_ok=True)
        with self._audit.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()


def _decode(kind: type, fields: dict[bytes, bytes]) -> Any:
    """A record from a stream entry's payload, or None (missing, cut short in a dead letter, or malformed)."""
    payload = fields.get(PAYLOAD)
    if payload is None or fields.get(b"truncated") == b"1":
        return None
    try:
        return kind.decode(payload)
    except (RecordError, ValueError, TypeError):
        return None


def _used(rollout: RolloutRecord, is_used: Callable[[str], bool]) -> bool:
    try:
        return is_used(sample_key(rollout))
    except RecordError:
        return False
