"""Several teachers, one per prompt domain: each rollout scored by the teacher its prompt names.

`MultiTeacherSource` routes by the rollout record's `teacher` field (the
prompt row's domain, carried by the workers): a name in the config's
`teachers` goes to that teacher, anything else (no name, or a name the
config lacks: counted in `opd_trainer_teacher_unrouted_rollouts_total` and
warned once per name) to the default `teacher`. Every teacher is any source
one endpoint can be (gRPC, `http(s)://`, offline file). At start-up every
teacher is checked against the student (the same tokenizer for all; a
mismatch names the domain, the teacher and the student). One step's
rollouts are fetched from all their teachers at once; the scores are one
map, as from one teacher. Per-teacher counters of rollouts and scored
tokens go to the trainer's `/metrics` (`collectors`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from prometheus_client import Counter

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from student_trainer.config import TeacherEndpointConfig, TrainerConfig
from student_trainer.score_sources.base import ScoreSource, TeacherMismatch
from teacher_server.client import TeacherInfo, TeacherScores

log = logging.getLogger(__name__)
DEFAULT = "default"  # the metrics label of the default teacher


class MultiTeacherSource:
    """The default `teacher` plus one source per name of `teachers` (a `ScoreSource`)."""

    def __init__(
        self,
        config: TrainerConfig,
        io: LoopThread,
        build: Callable[[TeacherEndpointConfig], ScoreSource],
        endpoints: dict[str, TeacherEndpointConfig],
    ) -> None:
        """`endpoints`: the default teacher (`DEFAULT`) and each domain's; `build`: one endpoint's source
        (`factory.endpoint_source`), called here so that a failed start closes the ones already built."""
        if DEFAULT in config.teachers:
            raise TeacherMismatch(f"teachers: {DEFAULT!r} names the default teacher (`teacher`); rename that domain")
        self._io = io
        self.top_k = config.teacher_top_k()
        self.temperature = config.loss.teacher_temperature
        self._sources: dict[str, ScoreSource] = {}
        try:
            for name, endpoint in endpoints.items():
                self._sources[name] = build(endpoint)
        except BaseException:
            self.close()
            raise
        self.full_vocab = any(getattr(s, "full_vocab", False) for s in self._sources.values())
        self._warned: set[str] = set()
        self.rollouts = Counter(
            "opd_trainer_teacher_rollouts_total",
            "rollouts sent to each teacher for scoring",
            ["teacher"],
            registry=None,
        )
        self.scored_tokens = Counter(
            "opd_trainer_teacher_scored_tokens_total",
            "response tokens scored by each teacher",
            ["teacher"],
            registry=None,
        )
        self.unrouted = Counter(
            "opd_trainer_teacher_unrouted_rollouts_total",
            "rollouts naming a teacher domain the config lacks (scored by the default teacher), by name",
            ["teacher"],
            registry=None,
        )
        self.collectors = (self.rollouts, self.scored_tokens, self.unrouted)
        self.retry_stats = _MergedRetryStats(
            [stats for s in self._sources.values() if (stats := getattr(s, "retry_stats", None)) is not None]
        )

    @property
    def info(self) -> TeacherInfo | None:
        return self._sources[DEFAULT].info

    @property
    def infos(self) -> dict[str, TeacherInfo | None]:
        """What each teacher said about itself at `check`, by domain."""
        return {name: source.info for name, source in self._sources.items()}

    def bytes_per_token(self) -> int:
        return max(source.bytes_per_token() for source in self._sources.values())

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        for name, source in self._sources.items():
            try:
                source.check(tokenizer_fingerprint, vocab_size, student_name)
            except TeacherMismatch as exc:
                where = "the default teacher (`teacher`)" if name == DEFAULT else f"teachers.{name}"
                raise TeacherMismatch(f"{where}: {exc}") from None

    def route(self, record: RolloutRecord) -> str:
        """The domain whose teacher scores `record`."""
        name = record.teacher
        if name is None or name in self._sources:
            return name or DEFAULT
        self.unrouted.labels(name).inc()
        if name not in self._warned:
            self._warned.add(name)
            log.warning("rollouts name teacher %r, which `teachers` lacks: the default teacher scores them", name)
        return DEFAULT

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        by_teacher: dict[str, list[RolloutRecord]] = {}
        for record in records:
            by_teacher.setdefault(self.route(record), []).append(record)
        for name, batch in by_teacher.items():
            self.rollouts.labels(name).inc(len(batch))
            self.scored_tokens.labels(name).inc(sum(len(r.response_ids) for r in batch))
        futures = [self._sources[name].fetch(batch) for name, batch in by_teacher.items()]
        return self._io.submit(_merge(futures))

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


class _MergedRetryStats:
    """Every teacher's retry counts as one `RetryStats` view (their addresses differ), read at scrape time."""

    def __init__(self, parts: list) -> None:
        self._parts = parts

    @property
    def counts(self) -> collections.Counter[tuple[str, str]]:
        return sum((part.counts for part in self._parts), collections.Counter())

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def _merge(futures: list[Future[dict[str, TeacherScores]]]) -> dict[str, TeacherScores]:
    merged: dict[str, TeacherScores] = {}
    for part in await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)):
        merged.update(part)
    return merged
