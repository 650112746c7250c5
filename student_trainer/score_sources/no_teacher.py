"""The score source of pure RL: asks no teacher (`teacher.enabled=false`).

`NoTeacherSource` implements `ScoreSource` with nothing behind it: `check`
accepts any student, `fetch` answers at once with no scores, and the step
trains on zero-weight placeholders in their place (the config requires
`loss.distill_weight=0`, so only the GRPO term, and its KL penalty to the
reference policy, train). Eval rounds get no scores either and report
rewards without a divergence. It opens no connection and needs no address.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig


class NoTeacherSource:
    """No teacher: every fetch is an empty reply, at once."""

    asks_teacher = False

    def __init__(self, config: TrainerConfig) -> None:
        self.top_k = config.teacher_top_k()  # the shape of the step's placeholders (never a real reply)
        self.full_vocab = False
        self.temperature = config.loss.teacher_temperature

    @property
    def info(self) -> None:
        return None

    def bytes_per_token(self) -> int:
        return 0

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        """Nothing to check: no teacher scores any token."""

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict]:
        done: Future[dict] = Future()
        done.set_result({})
        return done

    def close(self) -> None:
        """Nothing to close."""
