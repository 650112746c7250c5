"""Where a step's teacher scores come from: one interface, and today's source, the gRPC teacher.

Owns `ScoreSource`, what the training loop and the eval rounds ask of a
source of teacher scores: `check` it against the student once at start-up
(tokenizer fingerprint, vocabulary; a clear error naming both sides
otherwise), `fetch` the scores of a list of rollouts as a future of
{rollout_id: TeacherScores} (numpy arrays for the response positions, the
client's type), `info` and `close`. Another source (none for pure RL, an
HTTP teacher, several teachers, a file of offline scores) is one more class
here and one branch in `create_score_source`; the loop does not change.

`TeacherServiceSource` is the gRPC teacher through
`teacher_server.client.TeacherClient`, on the trainer's I/O loop: each
rollout is scored as prompt + response from the first response token, with
`top_k` from the config, the loss's teacher temperature, and the full
vocabulary when the loss reads it (refused at `check` by a teacher that does
not allow it).

A source also says what one scored token's reply costs in memory
(`bytes_per_token`, `reply_bytes_per_token` computes it), so that the
prefetch can bound the bytes it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.loss.registry import TeacherNeed, teacher_needs
from teacher_server.client import TeacherClient, TeacherInfo, TeacherScores


class TeacherMismatch(RuntimeError):
    """The teacher cannot serve this student (tokenizer, vocabulary, top-k or temperature)."""


class ScoreSource(Protocol):
    """Teacher scores for rollouts. `top_k`, `full_vocab` and `temperature` describe every reply it gives."""

    top_k: int  # k of each reply's top-k (0: the sampled token's log-prob only)
    full_vocab: bool  # replies carry full-vocabulary log-probs [P, V]
    temperature: float  # the teacher temperature the replies were made at

    def bytes_per_token(self) -> int:
        """Memory one scored token's reply takes once received (for the prefetch's byte cap)."""

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        """Raise TeacherMismatch unless this source can score the student's tokens."""

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        """Start fetching the scores of `records`' response tokens; the future maps rollout id -> scores."""

    @property
    def info(self) -> TeacherInfo | None:
        """What the teacher said about itself at `check` (None before)."""

    def close(self) -> None: ...


def reply_bytes_per_token(top_k: int, vocab_size: int | None, full_vocab: bool) -> int:
    """Bytes of one token's reply as the client holds it: float32 log-probs (token, tail, top-k, full
    vocabulary) and int32 top-k ids."""
    return 4 * (2 + 2 * top_k) + (4 * int(vocab_size or 0) if full_vocab else 0)


def create_score_source(config: TrainerConfig, io: LoopThread) -> ScoreSource:
    """The configured source of teacher scores (today: the teacher service at `teacher.addresses`)."""
    from student_trainer.score_sources import special_score_source  # several teachers, http(s)://, offline

    if (special := special_score_source(config, io)) is not None:
        return special
    return TeacherServiceSource(config, io)


class TeacherServiceSource:
    """Scores from the teacher service over gRPC (a `TeacherClient` on the I/O loop `io`)."""

    def __init__(self, config: TrainerConfig, io: LoopThread) -> None:
        self._io = io
        self.top_k = config.teacher_top_k()
        self.full_vocab = TeacherNeed.FULL in teacher_needs(config.loss)
        self.temperature = config.loss.teacher_temperature
        self._timeout_s = config.teacher.timeout_s
        self._info: TeacherInfo | None = None
        self._client: TeacherClient = io.call(self._make(config))
        self.retry_stats = self._client.retry_stats  # the client's retries, by target and code (trainer /metrics)

    @staticmethod
    async def _make(config: TrainerConfig) -> TeacherClient:
        t = config.teacher
        return TeacherClient(
            t.addresses,
            token=t.bearer_token(),
            client_name=t.client_name,
            timeout_s=t.timeout_s,
            logprob_dtype=t.logprob_dtype,
            tls=t.tls,
            tls_ca_file=t.tls_ca_file,
            tls_cert_file=t.tls_cert_file,
            tls_key_file=t.tls_key_file,
            tls_server_name=t.tls_server_name,
        )

    @property
    def info(self) -> TeacherInfo | None:
        return self._info

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        info = self._io.call(self._client.info(timeout_s=self._timeout_s))
        if info.tokenizer_fingerprint != tokenizer_fingerprint:
            raise TeacherMismatch(
                f"tokenizer mismatch: the teacher {info.model_name!r} has tokenizer fingerprint "
                f"{info.tokenizer_fingerprint[:16]}..., the student {student_name!r} has "
                f"{tokenizer_fingerprint[:16]}...; per-token scores only make sense with the same tokenizer: "
                f"pick a student of the teacher's family"
            )
        if info.vocab_size != vocab_size:
            raise TeacherMismatch(
                f"vocabulary size mismatch: teacher {info.model_name!r} has {info.vocab_size}, "
                f"student {student_name!r} has {vocab_size}"
            )
        if self.top_k > info.max_top_k:
            raise TeacherMismatch(
                f"the loss needs top-{self.top_k} teacher scores but the teacher serves at most "
                f"max_top_k={info.max_top_k}; lower teacher.top_k or raise the teacher's "
                f"--engine-max-top-k"
            )
        if self.full_vocab and not info.supports_full_vocab:
            raise TeacherMismatch(
                f"the loss reads full-vocabulary teacher log-probs (loss.support=full or "
                f"token_selection.jsd_support=full) but the {info.backend} teacher {info.model_name!r} does not "
                f"allow them: start it with --engine-allow-full-vocab, or use support=topk"
            )
        if self.temperature != 1.0 and not info.supports_temperature:
            raise TeacherMismatch(
                f"loss.teacher_temperature={self.temperature} but the {info.backend} teacher "
                f"cannot apply a temperature; use 1 or a teacher on the hf backend"
            )
        self._info = info

    def bytes_per_token(self) -> int:
        return reply_bytes_per_token(self.top_k, self._info.vocab_size if self._info else None, self.full_vocab)

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        return self._io.submit(self._score(list(records)))

    async def _score(self, records: list[RolloutRecord]) -> dict[str, TeacherScores]:
        requests = [(np.concatenate([r.prompt_ids, r.response_ids]), len(r.prompt_ids)) for r in records]
        temperature = None if self.temperature == 1.0 else self.temperature
        replies = await self._client.score_many(
            requests, top_k=self.top_k, full_vocab=self.full_vocab, temperature=temperature
        )
        return {r.rollout_id: s for r, s in zip(records, replies, strict=True)}

    def close(self) -> None:
        self._io.call(self._client.close())
