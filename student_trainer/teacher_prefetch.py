"""Teacher scores fetched ahead of time, so the teacher's latency hides behind the student's compute.

Owns the trainer's `TeacherClient` (on the trainer's I/O loop), the start-up
checks against the teacher's `Info` (tokenizer fingerprint, vocabulary size,
top-k support; a clear error naming both sides otherwise), and `submit`, which
asks for the scores of every rollout of a batch (token ids = prompt +
response, scored from the first response token) and returns a future of
{rollout_id: scores}.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from teacher_server.client import TeacherClient, TeacherInfo, TeacherScores


class TeacherMismatch(RuntimeError):
    """The teacher cannot serve this student (tokenizer, vocabulary or top-k)."""


class TeacherPrefetcher:
    def __init__(self, config: TrainerConfig, io: LoopThread) -> None:
        self._io = io
        self.top_k = config.teacher_top_k()
        self.temperature = config.loss.teacher_temperature
        self._client: TeacherClient = io.call(self._make(config))
        self._timeout_s = config.teacher.timeout_s

    @staticmethod
    async def _make(config: TrainerConfig) -> TeacherClient:
        t = config.teacher
        return TeacherClient(t.addresses, token=t.token, client_name=t.client_name, timeout_s=t.timeout_s,
                             logprob_dtype=t.logprob_dtype)

    def check(self, student_fingerprint: str, student_vocab: int, student_name: str) -> TeacherInfo:
        """Refuse to train against a teacher that cannot score this student's tokens."""
        info = self._io.call(self._client.info(timeout_s=self._timeout_s))
        if info.tokenizer_fingerprint != student_fingerprint:
            raise TeacherMismatch(
                f"tokenizer mismatch: the teacher {info.model_name!r} has tokenizer fingerprint "
                f"{info.tokenizer_fingerprint[:16]}..., the student {student_name!r} has {student_fingerprint[:16]}...; "
                f"per-token scores only make sense with the same tokenizer: pick a student of the teacher's family")
        if info.vocab_size != student_vocab:
            raise TeacherMismatch(f"vocabulary size mismatch: teacher {info.model_name!r} has {info.vocab_size}, "
                                  f"student {student_name!r} has {student_vocab}")
        if self.top_k > info.max_top_k:
            raise TeacherMismatch(f"the loss needs top-{self.top_k} teacher scores but the teacher serves at most "
                                  f"max_top_k={info.max_top_k}; lower teacher.top_k or raise the teacher's "
                                  f"--engine-max-top-k")
        if self.temperature != 1.0 and not info.supports_temperature:
            raise TeacherMismatch(f"loss.teacher_temperature={self.temperature} but the {info.backend} teacher "
                                  f"cannot apply a temperature; use 1 or a teacher on the hf backend")
        return info

    def submit(self, records: list[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        return self._io.submit(self._score(records))

    async def _score(self, records: list[RolloutRecord]) -> dict[str, TeacherScores]:
        requests = [(np.concatenate([r.prompt_ids, r.response_ids]), len(r.prompt_ids)) for r in records]
        temperature = None if self.temperature == 1.0 else self.temperature
        replies = await self._client.score_many(requests, top_k=self.top_k, temperature=temperature)
        return {r.rollout_id: s for r, s in zip(records, replies, strict=True)}

    def close(self) -> None:
        self._io.call(self._client.close())
