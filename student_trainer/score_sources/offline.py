"""Training from offline teacher scores (`teacher.scores_file`, written by `opd score`): no teacher running.

Off-policy top-k distillation: the sequences of the file are trained on
(not the student's own samples), against the teacher's top-k and tail
stored with them. Two parts:

- `OfflineScoreSource` (every rank): a `ScoreSource` answering from the file.
  At start-up it checks the file's metadata against the student (tokenizer
  fingerprint, vocabulary) and the loss (k: a file of top-k' >= k is cut to
  k, the rest folded into the tail exactly; the teacher temperature must be
  the file's). Each rollout must be the file's row of its id, token for
  token; reads run on a worker thread, so the prefetch overlaps them with
  the step.
- `OfflineRolloutFeeder` (rank 0, instead of the prompt feeder): pushes the
  file's sequences into `{ns}:rollouts` as rollout records (prompt =
  tokens before `score_from`, response = the rest, all trained), with the
  prompt feeder's bound on groups in flight and the latest announced policy
  version, so the staleness bound never drops them. Passes over the file
  repeat (ids get `#eN` from the second pass) until the run's steps are done;
  its `position` is checkpointed like the prompt feeder's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from opd.policy import read_policy
from opd.streams import ROLLOUT_GROUP, StreamProducer
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.groups.ledger import FeedStats
from student_trainer.score_sources.base import TeacherMismatch, check_teacher, reply_bytes_per_token
from student_trainer.score_sources.score_file import ScoreFileReader
from teacher_server.client import TeacherInfo, TeacherScores

log = logging.getLogger(__name__)
_PASS = re.compile(r"#e\d+$")


def fewer_topk(scores: TeacherScores, k: int) -> TeacherScores:
    """The first k of a reply's top-k' (k <= k'), the rest folded into the tail: log(exp(tail) + sum exp(rest))."""
    if scores.topk_ids.shape[1] == k:
        return scores
    rest = np.concatenate([scores.tail_logprobs[:, None], scores.topk_logprobs[:, k:]], axis=1).astype(np.float64)
    return TeacherScores(
        request_id=scores.request_id,
        score_from=scores.score_from,
        token_logprobs=scores.token_logprobs,
        topk_ids=np.ascontiguousarray(scores.topk_ids[:, :k]),
        topk_logprobs=np.ascontiguousarray(scores.topk_logprobs[:, :k]),
        tail_logprobs=np.logaddexp.reduce(rest, axis=1).astype(np.float32),
    )


class OfflineScoreSource:
    """Scores from a file of `opd score` (a `ScoreSource`)."""

    full_vocab = False

    def __init__(self, config: TrainerConfig, path: str) -> None:
        self.top_k = config.teacher_top_k()
        self.temperature = config.loss.teacher_temperature
        self._reader = ScoreFileReader(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline-scores")
        meta = self._reader.meta
        self._info = TeacherInfo(
            model_name=meta.teacher_model,
            backend=f"offline ({meta.teacher_backend or 'unknown'})",
            vocab_size=meta.vocab_size,
            tokenizer_fingerprint=meta.tokenizer_fingerprint,
            max_model_len=0,
            max_top_k=meta.top_k,
            supports_full_vocab=False,
            supports_temperature=False,
            server_version="",
            dtype=meta.dtype,
        )

    @property
    def info(self) -> TeacherInfo:
        return self._info

    def bytes_per_token(self) -> int:
        return reply_bytes_per_token(self.top_k, self._info.vocab_size, False)

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        where = f"the score file {str(self._reader.path)!r} of teacher"
        check_teacher(
            self._info, tokenizer_fingerprint, vocab_size, student_name, top_k=self.top_k, temperature=1.0, where=where
        )
        if self.temperature != self._reader.meta.temperature:
            raise TeacherMismatch(
                f"loss.teacher_temperature={self.temperature} but {where} {self._info.model_name!r} was scored at "
                f"temperature {self._reader.meta.temperature}: score again with `opd score --temperature "
                f"{self.temperature}`, or train at {self._reader.meta.temperature}"
            )

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        return self._pool.submit(self._lookup, list(records))

    def _lookup(self, records: list[RolloutRecord]) -> dict[str, TeacherScores]:
        out = {}
        for r in records:
            rid, token_ids, scores = self._reader.get(_PASS.sub("", r.rollout_id))
            if len(r.prompt_ids) != scores.score_from or not np.array_equal(
                np.concatenate([r.prompt_ids, r.response_ids]), token_ids
            ):
                raise TeacherMismatch(
                    f"rollout {r.rollout_id!r} is not the score file's row {rid!r} (other tokens or another "
                    f"first response token): train offline scores only on the rollouts the trainer feeds from it"
                )
            out[r.rollout_id] = fewer_topk(scores, self.top_k)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OfflineRolloutFeeder:
    """Feeds the score file's sequences into `{ns}:rollouts` (rank 0, in place of the prompt feeder, whose
    interface it has: the trainer reports groups taken, trained and stale; the checkpoint holds `position`)."""

    def __init__(self, source, config: TrainerConfig) -> None:
        """`source`: the trainer's `RolloutSource` (its Redis connection, keys and retry policy)."""
        batch = config.batch
        self.max_inflight = config.data.max_inflight_groups or batch.groups_per_step * max(
            1, batch.max_staleness - batch.prefetch_depth
        )
        self.position = 0  # rows fed over all passes; restored from a checkpoint
        self.trainer_step = 0  # set by the settlement (unused: offline rows have no policy version)
        self.stats = FeedStats()
        self.state = "starting"
        if not config.teacher.scores_file:
            raise ValueError("the offline score feeder reads teacher.scores_file: set it to a file `opd score` wrote")
        self._source, self._path = source, config.teacher.scores_file
        self._reader = ScoreFileReader(self._path)
        self._producer = StreamProducer(source.redis, source.keys.rollouts, ROLLOUT_GROUP, retry=source.retry)
        self._needed = config.max_steps * batch.groups_per_step
        self._inflight = 0
        self._room = asyncio.Event()

    def describe(self) -> str:
        return (
            f"offline feeder {self.state}: {self._inflight} of at most {self.max_inflight} in flight, "
            f"{self.position} rows fed ({len(self._reader)} in {self._path})"
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def accepts(self, prompt_id: str) -> bool:
        """Every rollout of `{ns}:rollouts` may join a group (the consumer drops copies)."""
        return True

    async def snapshot(self) -> dict[str, Any]:
        return self.checkpoint_state()

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("position", 0))

    async def start_up(self, is_used) -> None:
        """Rows fed after the last checkpoint are fed again from `position`; the rollout consumer drops copies."""

    async def on_taken(self, prompt_ids) -> None:
        self._inflight = max(0, self._inflight - len(list(prompt_ids)))
        self._room.set()

    async def on_trained(self, prompt_ids) -> None:
        return None

    async def on_stale(self, prompt_ids) -> None:
        """Rows dropped as stale are not fed again (offline data has no policy to be stale against: the trainer
        only falls behind the feeder when the staleness bound is below the prefetch depth)."""
        for pid in prompt_ids:
            self.stats.lost["stale"] += 1
            log.warning("offline row %s dropped as stale; raise batch.max_staleness", pid)

    async def run(self) -> None:
        """Feed rows from `position` on, pass after pass, until the run has what its steps need."""
        rows = len(self._reader)
        if not rows:
            raise TeacherMismatch(f"the score file {self._path!r} holds no rows")
        while self.position < self._needed:
            skip, epoch = self.position % rows, self.position // rows
            for index, (rid, token_ids, score_from) in enumerate(self._reader.sequences()):
                if index < skip:
                    continue
                await self._wait_for_room()
                self.state = "feeding"
                version = await read_policy(self._source.redis, self._source.keys, self._source.retry)
                record = _record(f"{rid}#e{epoch}" if epoch else rid, token_ids, score_from, version)
                await self._producer.send_many([record.encode()])
                self.position += 1
                self._inflight += 1
                if self.position >= self._needed:
                    break
        self.state = "done"
        log.info("offline feeder: %d rows fed (%d in the file)", self.position, rows)

    async def _wait_for_room(self) -> None:
        while self._inflight >= self.max_inflight:
            self.state = "waiting for room"
            self._room.clear()
            await self._room.wait()


def _record(rid: str, token_ids: np.ndarray, score_from: int, announcement) -> RolloutRecord:
    response = token_ids[score_from:]
    return RolloutRecord(
        rollout_id=rid,
        prompt_id=rid,
        group_id=rid,
        group_size=1,
        split="train",
        prompt_ids=token_ids[:score_from],
        response_ids=response,
        response_mask=np.ones(len(response), np.uint8),
        behaviour_logprobs=np.zeros(len(response), np.float32),  # not sampled: no behaviour policy
        policy_version=announcement.version if announcement is not None else 0,
        meta={"source": "offline-scores", "sample_index": 0},
    )
