"""The teacher's OpenAI-compatible port: vLLM's `/v1/completions` and `/v1/models`, served by opd's teacher.

The compatibility path for students in other frameworks (TRL, ms-swift,
verl, evaluation harnesses), which all score through vLLM's OpenAI API.
Every request goes through the gRPC service's own path: the caller is
identified by the same `Authenticator` (bearer token = the API key), each
prompt's scores through the servicer's `score_result` (the same validation,
fair-share scheduler and per-client metrics, rpc label `openai_completions`)
and each generation through its `generate_result` (the Generate path). The
JSON answers have vLLM's shapes (`openai_format.py`); the differences are
documented in docs/teacher-compat.md:

- `temperature` is the teacher temperature of the returned log-probs (exact
  on the hf backend, refused on vllm as over gRPC) as well as the sampling
  temperature; 0 means greedy sampling with temperature-1 log-probs. vLLM
  always returns temperature-1 log-probs.
- `max_tokens: 0` scores without generating, also without `echo`; usage
  then counts no completion token (vLLM counts the one it discards).
- Not served: `stream`, `n` > 1, stop strings, penalties, `logit_bias`,
  beam search, whole-vocabulary log-probs (-1): refused with HTTP 400 naming
  the field.

gRPC stays the fast path: JSON costs ~70 bytes per returned log-prob
(BENCHMARKS.md). `create_openai_app` builds the app; `OpenAIPort` serves it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd.model_source import load_tokenizer, resolve_model_dir
from opd.ops_app import OpsServer
from opd.tls import CertFiles
from protos import teacher_pb2 as pb
from protos.arrays import pack
from teacher_server import openai_format as fmt
from teacher_server.config import TeacherConfig
from teacher_server.errors import InvalidRequest, QueueFull, TeacherError
from teacher_server.servicer import TeacherServicer

log = logging.getLogger(__name__)
RPC = "openai_completions"
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503}
# Request fields of vLLM's API this port does not serve, with the values that mean "unused".
_REFUSED: dict[str, tuple[Any, ...]] = {
    "stop": (None, [], ""),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0, 0.0),
    "use_beam_search": (None, False),
    "best_of": (None, 1),
    "logprob_token_ids": (None, []),
    "prompt_embeds": (None,),
    "ignore_eos": (None, False),
    "min_tokens": (None, 0),
    "response_format": (None,),
    "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
}


class _ModelNotFound(TeacherError):
    """The request names a model this teacher does not serve (HTTP 404, as vLLM answers)."""


class CompletionBody(BaseModel):
    """The `/v1/completions` fields this port serves (others in `_REFUSED` are refused, the rest ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool | None = False
    add_special_tokens: bool = True
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None


def _error(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(fmt.error_json(message, status, param), status_code=status, headers=headers)


def _teacher_error(exc: TeacherError) -> JSONResponse:
    headers = None
    if isinstance(exc, QueueFull):  # the openai client retries a 429 after retry-after-ms (or Retry-After)
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
                   "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000)))}  # fmt: skip
    return _error(str(exc), _HTTP_STATUS.get(exc.code.name, 500), headers=headers)


def _parse(raw: Any) -> CompletionBody:
    """The request body, or InvalidRequest naming the field (vLLM answers 400 where FastAPI would say 422)."""
    if not isinstance(raw, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name, unused in _REFUSED.items():
        if name in raw and raw[name] not in unused:
            raise InvalidRequest(f"`{name}` is not supported by opd's teacher; leave it unset")
    if raw.get("logprobs") == -1 or raw.get("prompt_logprobs") == -1:
        raise InvalidRequest("log-probs of the whole vocabulary (-1) are not served here; ask for a top-k")
    try:
        body = CompletionBody.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"`{where}`: {first['msg']} (got {first.get('input')!r:.80})") from None
    if body.n != 1:
        raise InvalidRequest("`n` must be 1: send the prompt again for more samples")
    if body.stream:
        raise InvalidRequest("`stream` is not supported by opd's teacher; send stream=false")
    return body


class OpenAICompletions:
    """Answers `/v1/completions` for one teacher through its servicer."""

    def __init__(self, servicer: TeacherServicer, tokenizer: Any) -> None:
        self._servicer, self._tok = servicer, tokenizer
        self.text = fmt.TokenText(tokenizer)
        eos = tokenizer.eos_token_id
        self._eos: tuple[int, ...] = () if eos is None else (int(eos),)

    @property
    def info(self):
        return self._servicer.info

    def _prompts(self, body: CompletionBody) -> list[tuple[list[int], str | None]]:
        """(token ids, the text when given as text) per prompt."""
        prompt = body.prompt
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        out = []
        # a batch is a list of prompts, else the body holds one prompt: token ids or text either way
        items = cast("list[list[int] | str]", prompt if batch else [prompt])
        for i, item in enumerate(items):
            ids = self._tok.encode(item, add_special_tokens=body.add_special_tokens) if isinstance(item, str) else item
            if not ids:
                raise InvalidRequest(f"prompt {i} is empty; send token ids or text")
            out.append(([int(t) for t in ids], item if isinstance(item, str) else None))
        return out

    async def complete(self, body: CompletionBody, client: str) -> dict[str, Any]:
        if body.model is not None and body.model != self.info.model_name:
            raise _ModelNotFound(f"The model `{body.model}` does not exist. Served: `{self.info.model_name}`")
        for field in ("logprobs", "prompt_logprobs"):
            k = getattr(body, field)
            if k is not None and k > self.info.max_top_k:
                raise InvalidRequest(f"`{field}`={k} exceeds this teacher's max_top_k={self.info.max_top_k}")
        prompts = self._prompts(body)
        done = await asyncio.gather(
            *(self._choice(i, ids, text, body, client) for i, (ids, text) in enumerate(prompts))
        )
        return fmt.completion_json(
            f"cmpl-{uuid.uuid4().hex[:16]}",
            int(time.time()),
            self.info.model_name,
            [choice for choice, _, _ in done],
            sum(n for _, n, _ in done),
            sum(n for _, _, n in done),
        )

    async def _generate(self, ids: list[int], max_tokens: int, body: CompletionBody, client: str):
        request = pb.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_ids=pack(np.asarray(ids), pb.INT32), max_tokens=max_tokens
        )
        if body.temperature is not None:
            request.temperature = body.temperature
        if body.top_p is not None:
            request.top_p = body.top_p
        if body.seed is not None:
            request.seed = body.seed
        if body.stop_token_ids:  # vLLM stops at EOS as well as at the named tokens
            request.stop_token_ids.extend(dict.fromkeys([*body.stop_token_ids, *self._eos]))
        return await self._servicer.generate_result(client, request, "openai_generate")

    async def _score(self, full: list[int], first: int, k: int, body: CompletionBody, client: str):
        request = pb.ScoreRequest(
            request_id=uuid.uuid4().hex, token_ids=pack(np.asarray(full), pb.INT32), score_from=first, top_k=k
        )
        if body.temperature not in (None, 0.0, 1.0):
            request.temperature = body.temperature
        _, result = await self._servicer.score_result(client, request, None, RPC, token_ranks=True)
        return result

    async def _choice(
        self, index: int, ids: list[int], text: str | None, body: CompletionBody, client: str
    ) -> tuple[dict, int, int]:
        """One prompt's choice, its prompt tokens and its completion tokens."""
        length, limit, vocab = len(ids), self.info.max_model_len, self.info.vocab_size
        if length > limit:
            raise InvalidRequest(f"prompt {index} has {length} tokens; this teacher's max_model_len is {limit}")
        if not all(0 <= t < vocab for t in ids):  # also when nothing is scored or generated (echo only)
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidRequest(f"prompt {index} contains token id {bad} outside the vocabulary [0, {vocab})")
        max_tokens = min(16 if body.max_tokens is None else body.max_tokens, limit - length)
        gen_ids, finish = [], "length"
        if max_tokens >= 1:
            generated = await self._generate(ids, max_tokens, body, client)
            gen_ids, finish = [int(t) for t in generated.token_ids], generated.finish_reason
        full = ids + gen_ids
        k_prompt = body.prompt_logprobs if body.prompt_logprobs is not None else body.logprobs if body.echo else None
        want_gen = body.logprobs is not None and bool(gen_ids)
        first = 1 if k_prompt is not None else length
        prompt_entries: list[fmt.Position | None] = [None]
        gen_entries: list[fmt.Position] = []
        if (k_prompt is not None or want_gen) and first < len(full):
            k = max(k_prompt or 0, body.logprobs or 0)
            result = await self._score(full, first, k, body, client)
            if k_prompt is not None:
                prompt_entries += fmt.positions(full, 1, length, first, result, k_prompt, self.text, 1)
            if want_gen and body.logprobs is not None:  # want_gen implies it; said again for the type checker
                gen_entries = fmt.positions(full, length, len(full), first, result, body.logprobs, self.text, length)
        return (
            self._choice_json(index, ids, text, gen_ids, finish, body, prompt_entries, gen_entries, k_prompt),
            length,
            len(gen_ids),
        )

    def _choice_json(self, index, ids, text, gen_ids, finish, body, prompt_entries, gen_entries, k_prompt) -> dict:
        prompt_text = "" if body.return_token_ids else (text if text is not None else self.text.decode(ids))
        out_text = self.text.completion_text(gen_ids)
        legacy = None
        if body.logprobs is not None:
            seq, entries = (ids + gen_ids, prompt_entries + gen_entries) if body.echo else (gen_ids, gen_entries)
            legacy = fmt.legacy_logprobs_json(
                seq, entries, body.logprobs, self.text, as_ids=bool(body.return_tokens_as_token_ids)
            )
        stop_reason = None
        if finish == "stop" and gen_ids and gen_ids[-1] not in self._eos and gen_ids[-1] in (body.stop_token_ids or ()):
            stop_reason = gen_ids[-1]
        return fmt.choice_json(
            index,
            prompt_text + out_text if body.echo else out_text,
            finish,
            stop_reason,
            logprobs=legacy,
            prompt_logprobs=fmt.prompt_logprobs_json(prompt_entries) if k_prompt is not None else None,
            prompt_token_ids=ids if body.return_token_ids else None,
            token_ids=gen_ids if body.return_token_ids else None,
        )


def create_openai_app(servicer: TeacherServicer, tokenizer: Any) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible port (auth per request, as gRPC does it)."""
    app = FastAPI(title="opd teacher (OpenAI-compatible)", docs_url="/docs", redoc_url=None)
    completions = OpenAICompletions(servicer, tokenizer)
    created = int(time.time())

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.get("/v1/models")
    def models(request: Request) -> JSONResponse:
        try:
            servicer.auth.identify(request.headers.items())
        except TeacherError as exc:
            return _teacher_error(exc)
        return JSONResponse(fmt.models_json(servicer.info.model_name, servicer.info.max_model_len, created))

    @app.post("/v1/completions")
    async def complete(request: Request) -> JSONResponse:
        try:
            client = servicer.auth.identify(request.headers.items())
            try:
                raw = await request.json()
            except ValueError:
                raise InvalidRequest("the request body is not valid JSON") from None
            return JSONResponse(await completions.complete(_parse(raw), client))
        except _ModelNotFound as exc:
            return _error(str(exc), 404, "model")
        except TeacherError as exc:
            return _teacher_error(exc)

    return app


def _cert_files(config: TeacherConfig) -> CertFiles | None:
    """The port's own certificate, else gRPC's (the same TLS as gRPC), else None (plain HTTP)."""
    o, g = config.openai, config.grpc
    if o.tls_cert_file and o.tls_key_file:
        return CertFiles(o.tls_cert_file, o.tls_key_file, option="openai")
    if g.tls_cert_file and g.tls_key_file:
        return CertFiles(g.tls_cert_file, g.tls_key_file, option="grpc")
    return None


class OpenAIPort:
    """The OpenAI-compatible HTTP server of one teacher (started only when `openai.port` is set)."""

    def __init__(self, config: TeacherConfig, servicer: TeacherServicer) -> None:
        tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else resolve_model_dir(config.model))
        app = create_openai_app(servicer, tokenizer)
        self.host = config.openai.host
        self._server = OpsServer(
            app, config.openai.host, config.openai.port or 0, tls=_cert_files(config), warn_open=False
        )
        self.port: int | None = None

    @property
    def scheme(self) -> str:
        return self._server.scheme

    async def start(self) -> int:
        self.port = await self._server.start()
        return self.port

    async def stop(self) -> None:
        await self._server.stop()
