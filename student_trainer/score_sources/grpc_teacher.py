"""`TeacherServiceSource`: the trainer's teacher scores from the opd teacher service over gRPC.

A `TeacherClient` (`teacher_server.client`) on the trainer's I/O loop: each
rollout is scored as prompt + response from the first response token, with
`top_k` from the config, the loss's teacher temperature, and the full
vocabulary when the loss reads it. At start-up `check` asks the teacher's
`Info` and runs the one compatibility check (`base.check_teacher`). The
client's retries are counted by target and code (`retry_stats`, on the
trainer's /metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.loss.registry import TeacherNeed, teacher_needs
from student_trainer.score_sources.base import check_teacher, reply_bytes_per_token
from teacher_server.client import TeacherClient, TeacherInfo, TeacherScores


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
        check_teacher(
            info,
            tokenizer_fingerprint,
            vocab_size,
            student_name,
            top_k=self.top_k,
            temperature=self.temperature,
            full_vocab=self.full_vocab,
            top_k_fix="lower teacher.top_k or raise the teacher's --engine-max-top-k",
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
