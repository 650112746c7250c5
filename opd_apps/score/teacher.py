"""The teacher `opd score` asks: an opd teacher over gRPC, or an OpenAI-compatible server over HTTP.

Owns opening either one from the `opd score` config, checking what the file's
metadata will claim (the teacher's tokenizer fingerprint: from the teacher's
`Info` over gRPC, from `--tokenizer` over HTTP, and both when both are there;
a temperature the teacher cannot apply exactly is refused), and scoring one
batch of sequences concurrently into score-file rows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer.score_sources.base import TeacherMismatch, check_teacher
from student_trainer.score_sources.openai_client import OpenAIScoreClient, TeacherHTTPError
from student_trainer.score_sources.score_file import ScoreFileMeta
from teacher_server.client import TeacherClient, TeacherClientError

if TYPE_CHECKING:
    from opd_apps.score.command import ScoreConfig


class ScoringError(RuntimeError):
    """The teacher cannot produce the scores asked for (refused, unreachable, or another tokenizer)."""


def _load_tokenizer(directory: str | None) -> Any:
    if not directory:
        return None
    from opd.model_source import load_tokenizer

    return load_tokenizer(Path(directory))


@dataclass
class Scorer:
    meta: ScoreFileMeta
    tokenizer: Any  # the teacher's, for chat rows (None: token-id rows only)
    _grpc: TeacherClient | None = None
    _http: OpenAIScoreClient | None = None
    _model: str = ""
    _temperature: float | None = None

    async def score(self, batch: list[tuple[str, np.ndarray, int]]) -> list[tuple[str, np.ndarray, Any]]:
        """Rows (id, token ids, scores) of one batch, scored concurrently."""
        k = self.meta.top_k
        try:
            if self._grpc is not None:
                requests = [(ids, score_from) for _, ids, score_from in batch]
                replies = await self._grpc.score_many(requests, top_k=k, temperature=self._temperature)
            else:
                assert self._http is not None
                replies = await asyncio.gather(*(self._http.score(self._model, ids, s, k) for _, ids, s in batch))
        except (TeacherClientError, TeacherHTTPError) as exc:
            raise ScoringError(f"the teacher refused a batch (first id {batch[0][0]!r}): {exc}") from None
        return [(rid, ids, reply) for (rid, ids, _), reply in zip(batch, replies, strict=True)]

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
        if self._http is not None:
            await self._http.close()


async def open_scorer(config: ScoreConfig) -> Scorer:
    tokenizer = _load_tokenizer(config.tokenizer)
    local = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    if config.teacher[0].startswith(("http://", "https://")):
        return await _http_scorer(config, tokenizer, local)
    client = TeacherClient(
        config.teacher,
        token=config.token,
        client_name=config.client_name,
        timeout_s=config.timeout_s,
        tls_ca_file=config.tls_ca_file,
    )
    try:
        info = await client.info()
    except TeacherClientError as exc:
        await client.close()
        raise ScoringError(f"the teacher at {config.teacher[0]} did not answer Info: {exc}") from None
    try:  # the one teacher-compatibility check the trainer uses
        check_teacher(
            info,
            info.tokenizer_fingerprint if local is None else local,
            None,
            f"--tokenizer {config.tokenizer!r}",
            top_k=config.top_k,
            temperature=config.temperature,
            top_k_fix="lower --top-k",
            temperature_name="--temperature",
        )
    except TeacherMismatch as exc:
        await client.close()
        raise ScoringError(str(exc)) from None
    meta = ScoreFileMeta(
        teacher_model=info.model_name,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        top_k=config.top_k,
        dtype=config.dtype,
        temperature=config.temperature,
        teacher_backend=info.backend,
        vocab_size=info.vocab_size,
    )
    temperature = None if config.temperature == 1.0 else config.temperature
    return Scorer(meta, tokenizer, _grpc=client, _temperature=temperature)


async def _http_scorer(config: ScoreConfig, tokenizer: Any, fingerprint: str | None) -> Scorer:
    if fingerprint is None:
        raise ScoringError("an http(s):// teacher needs --tokenizer DIR (its API does not expose the vocabulary)")
    if config.temperature != 1.0:
        raise ScoringError("an OpenAI-compatible server returns temperature-1 log-probs: use --temperature 1")
    client = OpenAIScoreClient(
        config.teacher, token=config.token, client_name=config.client_name, timeout_s=config.timeout_s,
        tls_ca_file=config.tls_ca_file,
    )  # fmt: skip
    try:
        models = await client.models()
    except (TeacherHTTPError, OSError) as exc:
        await client.close()
        raise ScoringError(f"the teacher at {config.teacher[0]} did not list its models: {exc}") from None
    model = config.served_model or (str(models[0]["id"]) if models else "")
    if not model:
        await client.close()
        raise ScoringError(f"the teacher at {config.teacher[0]} serves no model")
    meta = ScoreFileMeta(
        teacher_model=model,
        tokenizer_fingerprint=fingerprint,
        top_k=config.top_k,
        dtype=config.dtype,
        temperature=1.0,
        teacher_backend="openai-http",
        vocab_size=0,  # unknown: the API does not say how many rows the teacher's lm-head has
    )
    return Scorer(meta, tokenizer, _http=client, _model=model)
