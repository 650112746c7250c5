"""The start-up check every score source runs: can this teacher's scores train this student?

One function, `check_against_student`, with the messages that name both
sides (teacher and student) and what to change; the HTTP, offline and
several-teacher sources call it with the facts they have.
"""

from __future__ import annotations

from student_trainer.score_source import TeacherMismatch
from teacher_server.client import TeacherInfo


def check_against_student(
    info: TeacherInfo,
    tokenizer_fingerprint: str,
    vocab_size: int | None,
    student_name: str,
    top_k: int,
    temperature: float,
    where: str = "the teacher",
) -> None:
    """Raise TeacherMismatch unless `info` can score the student's tokens; `vocab_size` None: not known."""
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
            f"top-{info.max_top_k}; lower teacher.top_k"
        )
    if temperature != 1.0 and not info.supports_temperature:
        raise TeacherMismatch(
            f"loss.teacher_temperature={temperature} but {where} {info.model_name!r} ({info.backend}) cannot "
            f"apply a temperature; use 1 or an opd teacher on the hf backend"
        )
