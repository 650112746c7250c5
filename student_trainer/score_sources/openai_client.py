"""Teacher scores from an OpenAI-compatible `/v1/completions` server: vLLM's own, or an opd teacher's
`--openai-port`.

Owns the one request this path makes (`prompt` = token ids, `echo` with
`max_tokens: 0` so nothing is generated where the server allows it,
`prompt_logprobs: k`), reading vLLM's per-position answer back into the
`TeacherScores` arrays the trainer uses (`scores_from_prompt_logprobs`: the
actual token's log-prob, the top-k by rank, and the tail mass
log(1 - sum exp(top-k)) computed in float64 with `-expm1`, -inf when the
top-k holds all the mass), retries with backoff until the deadline for what
is transient (connection failures, 429, 502-504), and HTTP errors mapped to
`TeacherHTTPError` with the server's message. Imports httpx and numpy only.

What this API cannot give, it does not pretend to: it has no vocabulary
(the tokenizer is checked from a local directory by the caller), no
whole-vocabulary log-probs and no teacher temperature (prompt log-probs are
always at temperature 1).
"""

from __future__ import annotations

import itertools
import logging
import math
import ssl
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from opd.retry import Backoff, RetryLog, RetryStats, retry_async
from teacher_server.client import TeacherScores

log = logging.getLogger(__name__)
_JSON_NEG_INF = -9999.0  # vLLM writes -inf as this
_TRANSIENT = {429, 502, 503, 504}
_BACKOFF = Backoff(initial_s=0.1, max_s=5.0)  # frozen: one shared default


class TeacherHTTPError(RuntimeError):
    """The server answered with an error (`status`), or with something that is not vLLM's answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def tail_logprobs(topk_logprobs_PK: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(top-k)) per row [P], in float64 (-expm1 keeps a tiny tail exact), -inf when the top-k
    holds all the mass; 0 (the whole mass) when k = 0."""
    x = np.asarray(topk_logprobs_PK, dtype=np.float64)
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1], dtype=np.float32)
    top_mass_log = np.logaddexp.reduce(x, axis=-1)
    with np.errstate(divide="ignore"):
        tail = np.where(top_mass_log < 0, np.log(-np.expm1(np.minimum(top_mass_log, 0.0))), -np.inf)
    return tail.astype(np.float32)


def _logprob(value: float) -> float:
    return -math.inf if value <= _JSON_NEG_INF else float(value)


def scores_from_prompt_logprobs(
    prompt_logprobs: Sequence[dict[str, dict] | None], token_ids: Sequence[int], score_from: int, k: int
) -> TeacherScores:
    """vLLM's `prompt_logprobs` (entry p: token id -> {logprob, rank}, the actual token first, then the top-k
    by rank; the actual token once when among them) -> the scores of positions [score_from, len)."""
    length = len(token_ids)
    if len(prompt_logprobs) != length:
        raise TeacherHTTPError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {length} prompt tokens")
    positions = length - score_from
    token_lp = np.empty(positions, np.float32)
    top_ids = np.empty((positions, k), np.int32)
    top_lps = np.empty((positions, k), np.float32)
    for j, p in enumerate(range(score_from, length)):
        entry = prompt_logprobs[p] or {}
        actual = entry.get(str(int(token_ids[p])))
        if actual is None:
            raise TeacherHTTPError(f"prompt_logprobs[{p}] lacks the prompt's token {int(token_ids[p])}")
        items = list(entry.items())
        if len(items) == k + 1:  # the actual token outside the top-k: first, then the top-k in rank order
            top = items[1:]
        elif len(items) == k:  # the actual token among the top-k
            top = sorted(items, key=lambda item: item[1]["rank"])
        else:
            raise TeacherHTTPError(
                f"prompt_logprobs[{p}] has {len(items)} entries; a top-{k} request gives {k} or {k + 1}"
            )
        token_lp[j] = _logprob(actual["logprob"])
        top_ids[j] = [int(t) for t, _ in top]
        top_lps[j] = [_logprob(v["logprob"]) for _, v in top]
    return TeacherScores(
        request_id="",
        score_from=score_from,
        token_logprobs=token_lp,
        topk_ids=top_ids,
        topk_logprobs=top_lps,
        tail_logprobs=tail_logprobs(top_lps),
    )


def _base_url(address: str) -> str:
    address = address.rstrip("/")
    return address if address.endswith("/v1") else f"{address}/v1"


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, TeacherHTTPError) and exc.status in _TRANSIENT)


class OpenAIScoreClient:
    """Async client of one or more OpenAI-compatible servers (used round-robin). Create it on its event loop."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        token: str | None = None,
        client_name: str | None = None,
        timeout_s: float = 300.0,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        max_concurrency: int = 16,
        backoff: Backoff = _BACKOFF,
        retry_stats: RetryStats | None = None,
    ) -> None:
        headers = {"x-opd-client": client_name} if client_name else {}
        if token:
            headers["authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=tls_ca_file) if tls_ca_file else True
        if tls_cert_file and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(tls_cert_file, tls_key_file)
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s, verify=verify, limits=limits)
        self.addresses = [_base_url(a) for a in addresses]
        self._next = itertools.cycle(self.addresses)
        self._timeout_s, self._backoff = timeout_s, backoff
        self._retries = RetryLog(log, "OpenAI-compatible teacher call", stats=retry_stats)
        self.retry_stats = self._retries.stats

    async def _call(self, method: str, path: str, body: dict | None, timeout_s: float | None) -> Any:
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        address = ""

        async def attempt() -> Any:
            nonlocal address
            address = next(self._next)
            remaining = max(0.001, deadline - time.monotonic())
            response = await self._http.request(method, f"{address}{path}", json=body, timeout=remaining)
            if response.status_code >= 400:
                raise TeacherHTTPError(f"{address}{path}: HTTP {response.status_code}: {_message(response)}",
                                       response.status_code)  # fmt: skip
            return response.json()

        def note(attempt_no: int, exc: BaseException, delay_s: float) -> None:
            reason = f"http_{exc.status}" if isinstance(exc, TeacherHTTPError) else type(exc).__name__
            self._retries.note(address, attempt_no, delay_s, exc, reason=reason)

        return await retry_async(
            attempt, retryable=_retryable, backoff=self._backoff, max_attempts=None, deadline_s=deadline, on_retry=note
        )

    async def models(self, timeout_s: float | None = None) -> list[dict]:
        """`GET /v1/models`: the served models (`id`, and `max_model_len` on vLLM and opd)."""
        return list((await self._call("GET", "/models", None, timeout_s)).get("data") or [])

    async def score(
        self,
        model: str,
        token_ids: Sequence[int] | np.ndarray,
        score_from: int,
        top_k: int,
        timeout_s: float | None = None,
    ) -> TeacherScores:
        """Temperature-1 log-probs of positions [score_from, len(token_ids)) with their top-`top_k`."""
        ids = [int(t) for t in token_ids]
        body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "prompt_logprobs": top_k}
        answer = await self._call("POST", "/completions", body, timeout_s)
        try:
            prompt_logprobs = answer["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise TeacherHTTPError(f"the answer has no choices[0].prompt_logprobs: {str(answer)[:200]}") from None
        scores = scores_from_prompt_logprobs(prompt_logprobs, ids, score_from, top_k)
        scores.request_id = uuid.uuid4().hex
        return scores

    async def close(self) -> None:
        await self._http.aclose()


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error or response.text)[:500]
    except ValueError:
        return response.text[:500]
