"""`HttpTeacherSource`: the trainer's teacher scores from an `http(s)://` teacher — a plain vLLM server (or
any server of vLLM's OpenAI API, an opd teacher's `--openai-port` included).

At start-up it reads the served model from `/v1/models`, computes the
tokenizer fingerprint from `teacher.tokenizer` (a local directory: the API
exposes no vocabulary; the vocabulary size is checked too when that
directory holds the model's config.json) and sends one top-k request, so a
server that refuses that k (vLLM's `--max-logprobs`) fails the start, not
the first step. Scores come from `prompt_logprobs` (`openai_client.py`),
up to 16 requests in flight per trainer rank. Temperature-1 and top-k only:
the config refuses a teacher temperature or a full-vocabulary loss for such
a teacher when it loads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer.config import TeacherEndpointConfig, TrainerConfig
from student_trainer.score_sources.base import TeacherMismatch, check_teacher, reply_bytes_per_token
from student_trainer.score_sources.openai_client import OpenAIScoreClient, TeacherHTTPError
from teacher_server.client import TeacherInfo, TeacherScores

log = logging.getLogger(__name__)


def _tokenizer_facts(directory: str) -> tuple[str, int | None]:
    """(fingerprint, vocabulary size from config.json or None) of the teacher's local tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise TeacherMismatch(f"teacher.tokenizer {directory!r} holds no loadable tokenizer ({exc})") from None
    config = Path(directory) / "config.json"
    vocab = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return tokenizer_fingerprint(tokenizer), (int(vocab) if vocab else None)


class HttpTeacherSource:
    """Scores from an OpenAI-compatible server at `endpoint.addresses` (a `ScoreSource`)."""

    full_vocab = False  # the API gives top-k log-probs only (a full-vocabulary loss is refused at config load)

    def __init__(self, config: TrainerConfig, endpoint: TeacherEndpointConfig, io: LoopThread) -> None:
        self._io, self._endpoint = io, endpoint
        self.top_k = config.teacher_top_k()
        self.temperature = config.loss.teacher_temperature
        self._model: str | None = endpoint.served_model
        self._info: TeacherInfo | None = None
        self._client: OpenAIScoreClient = io.call(self._make(endpoint))
        self.retry_stats = self._client.retry_stats

    @staticmethod
    async def _make(e: TeacherEndpointConfig) -> OpenAIScoreClient:
        return OpenAIScoreClient(
            e.addresses,
            token=e.bearer_token(),
            client_name=e.client_name,
            timeout_s=e.timeout_s,
            tls_ca_file=e.tls_ca_file,
            tls_cert_file=e.tls_cert_file,
            tls_key_file=e.tls_key_file,
        )

    @property
    def info(self) -> TeacherInfo | None:
        return self._info

    def bytes_per_token(self) -> int:
        return reply_bytes_per_token(self.top_k, None, False)

    def check(self, tokenizer_fingerprint: str, vocab_size: int, student_name: str) -> None:
        where = f"the teacher at {self._client.addresses[0]}"
        fingerprint, teacher_vocab = _tokenizer_facts(self._endpoint.tokenizer or "")
        try:
            models = self._io.call(self._client.models(self._endpoint.timeout_s))
        except (TeacherHTTPError, OSError) as exc:
            raise TeacherMismatch(f"{where} did not list its models (GET /v1/models): {exc}") from None
        served = {m["id"]: m for m in models if m.get("id") is not None}
        if self._model is None:
            if not models:
                raise TeacherMismatch(f"{where} serves no model (GET /v1/models is empty)")
            self._model = str(models[0]["id"])
        elif self._model not in served:
            raise TeacherMismatch(
                f"{where} does not serve teacher.served_model={self._model!r}; it serves {sorted(served)}"
            )
        self._info = TeacherInfo(
            model_name=self._model,
            backend="openai-http",
            vocab_size=teacher_vocab or 0,
            tokenizer_fingerprint=fingerprint,
            max_model_len=int(served.get(self._model, {}).get("max_model_len") or 0),
            max_top_k=self.top_k,  # verified by the probe below
            supports_full_vocab=False,
            supports_temperature=False,
            server_version="",
            dtype="unknown",
        )
        check_teacher(
            self._info,
            tokenizer_fingerprint,
            vocab_size,
            student_name,
            top_k=self.top_k,
            temperature=self.temperature,
            where=where,
        )
        try:  # one request of the configured k: a server that refuses it fails the start, not the first step
            self._io.call(self._client.score(self._model, [0, 0], 1, self.top_k, self._endpoint.timeout_s))
        except TeacherHTTPError as exc:
            raise TeacherMismatch(
                f"{where} refused a top-{self.top_k} prompt_logprobs request ({exc}); start vLLM with "
                f"--max-logprobs >= {self.top_k}, or lower teacher.top_k"
            ) from None

    def fetch(self, records: Sequence[RolloutRecord]) -> Future[dict[str, TeacherScores]]:
        return self._io.submit(self._score(list(records)))

    async def _score(self, records: list[RolloutRecord]) -> dict[str, TeacherScores]:
        assert self._model is not None, "check() first"
        replies = await asyncio.gather(
            *(
                self._client.score(
                    self._model, np.concatenate([r.prompt_ids, r.response_ids]), len(r.prompt_ids), self.top_k
                )
                for r in records
            )
        )
        return {r.rollout_id: s for r, s in zip(records, replies, strict=True)}

    def close(self) -> None:
        self._io.call(self._client.close())
