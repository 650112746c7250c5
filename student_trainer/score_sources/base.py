"""What every source of teacher scores is: the `ScoreSource` interface, its error, and the one start-up check.

Owns `ScoreSource`, what the training loop and the eval rounds ask of a
source of teacher scores: `check` it against the student once at start-up,
`fetch` the scores of a list of rollouts as a future of
{rollout_id: TeacherScores} (numpy arrays for the response positions, the
client's type), `info` and `close`; `TeacherMismatch`, the error of a teacher
that cannot serve this student; `check_teacher`, the one compatibility check
every source runs with the facts it has (tokenizer fingerprint, vocabulary,
top-k, full vocabulary, temperature), with messages that name both sides
and what to change; and `reply_bytes_per_token`, what one scored token's
reply costs in memory, so that the prefetch can bound the bytes it holds.
The sources themselves are the package's other modules (`factory` picks one).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from protos.records import RolloutRecord
from teacher_server.client import TeacherInfo, TeacherScores


class TeacherMismatch(RuntimeError):
    """The teacher cannot serve this student (tokenizer, vocabulary, top-k or temperature)."""


class ScoreSource(Protocol):
    """Teacher scores for rollouts. `top_k`, `full_vocab` and `temperature` describe every reply it gives."""

    top_k: int  # k of each reply's top-k (0: the sampled token's log-prob only)
    full_vocab: bool  # replies carry full-vocabulary log-probs [P, V]
    temperature: float  # the teacher temperature the replies were made at

    def bytes_per_token(self) -> int:
        """Memory one scored token's reply takes once received (for the prefetch's byte cap)."""
        ...

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        """Raise TeacherMismatch unless this source can score the student's tokens."""

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        """Start fetching the scores of `records`' response tokens; the future maps rollout id -> scores."""
        ...

    @property
    def info(self) -> TeacherInfo | None:
        """What the teacher said about itself at `check` (None before)."""

    def close(self) -> None: ...


def reply_bytes_per_token(top_k: int, vocab_size: int | None, full_vocab: bool) -> int:
    """Bytes of one token's reply as the client holds it: float32 log-probs (token, tail, top-k, full
    vocabulary) and int32 top-k ids."""
    return 4 * (2 + 2 * top_k) + (4 * int(vocab_size or 0) if full_vocab else 0)


def check_teacher(
    info: TeacherInfo,
    tokenizer_fingerprint: str,
    vocab_size: int | None,
    student_name: str,
    *,
    top_k: int,
    temperature: float,
    full_vocab: bool = False,
    where: str = "the teacher",
    top_k_fix: str = "lower teacher.top_k",
    temperature_name: str = "loss.teacher_temperature",
) -> None:
    """Raise TeacherMismatch unless `info` can score the student's tokens with the loss's `top_k`, `temperature`
    and (when `full_vocab`) full-vocabulary log-probs; `vocab_size` None: the student's is not known;
    `top_k_fix`: what to change when the teacher's k is too small (the source knows its knob);
    `temperature_name`: the option that set `temperature`, for the message."""
    if info.tokenizer_fingerprint != tokenizer_fingerprint:
        raise TeacherMismatch(
            f"tokenizer mismatch: {where} {info.model_name!r} has tokenizer fingerprint "
            f"{info.tokenizer_fingerprint[:16]}..., the student {student_name!r} has {tokenizer_fingerprint[:16]}...; "
            f"per-token scores only make sense with the same tokenizer: pick a student of the teacher's family"
        )
    if vocab_size is not None and info.vocab_size and info.vocab_size != vocab_size:
        raise TeacherMismatch(
            f"vocabulary size mismatch: {where} {info.model_name!r} has {info.vocab_size}, "
            f"the student {student_name!r} has {vocab_size}"
        )
    if top_k > info.max_top_k:
        raise TeacherMismatch(
            f"the loss needs top-{top_k} teacher scores but {where} {info.model_name!r} gives at most "
            f"top-{info.max_top_k}; {top_k_fix}"
        )
    if full_vocab and not info.supports_full_vocab:
        raise TeacherMismatch(
            f"the loss reads full-vocabulary teacher log-probs (loss.support=full or "
            f"token_selection.jsd_support=full) but the {info.backend} teacher {info.model_name!r} does not "
            f"allow them: start it with --engine-allow-full-vocab, or use support=topk"
        )
    if temperature != 1.0 and not info.supports_temperature:
        raise TeacherMismatch(
            f"{temperature_name}={temperature} but {where} {info.model_name!r} ({info.backend}) cannot "
            f"apply a temperature; use 1 or an opd teacher on the hf backend"
        )
