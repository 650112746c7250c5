"""The teacher's routes on the shared ops port: `/v1/info` and the JSON `/v1/score` slow path.

`/v1/score` exists for curl and non-Python clients; it goes through the same
auth, validation and fair scheduler as gRPC `Score` (the servicer's
`score_result`), but JSON costs ~10x the bytes of packed arrays: use gRPC for
training traffic. `-inf` log-probs (an empty tail) are returned as null.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from protos import teacher_pb2 as pb
from protos.arrays import pack
from teacher_server.errors import InvalidRequest, QueueFull, TeacherError
from teacher_server.servicer import TeacherServicer

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 503,
}


class ScoreJSON(BaseModel):
    token_ids: list[int] = Field(description="the whole sequence")
    score_from: int = Field(ge=0, le=2**32 - 1, description="first position to score")
    top_k: int = Field(default=0, ge=0, le=2**32 - 1)
    full_vocab: bool = False
    temperature: float | None = None
    request_id: str = ""
    timeout_s: float | None = Field(default=None, gt=0)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _floats(a: np.ndarray) -> list:
    return [_floats(x) for x in a] if a.ndim > 1 else [None if not math.isfinite(v) else v for v in a.tolist()]


def _error(exc: TeacherError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if isinstance(exc, QueueFull) else None
    return JSONResponse(
        {"error": {"code": exc.code.name, "message": str(exc)}},
        status_code=_HTTP_STATUS.get(exc.code.name, 500),
        headers=headers,
    )


def teacher_router(servicer: TeacherServicer) -> APIRouter:
    router = APIRouter()
    info_json = dataclasses.asdict(servicer.info)

    @router.get("/v1/info")
    def info() -> dict:
        return info_json

    @router.post("/v1/score")
    async def score(body: ScoreJSON, request: Request) -> JSONResponse:
        try:
            client = servicer.auth.identify(request.headers.items())
            if any(not -(2**31) <= t < 2**31 for t in body.token_ids):
                raise InvalidRequest("token_ids must be int32 values")
            if _has_surrogate(body.request_id):
                raise InvalidRequest("request_id must be valid Unicode text (a lone surrogate is not)")
            req = pb.ScoreRequest(
                request_id=body.request_id,
                token_ids=pack(np.asarray(body.token_ids), pb.INT32),
                score_from=body.score_from,
                top_k=body.top_k,
                full_vocab=body.full_vocab,
            )
            if body.temperature is not None:
                req.temperature = body.temperature
            work, result = await servicer.score_result(client, req, body.timeout_s, "http_score")
        except TeacherError as exc:
            return _error(exc)
        out = {
            "request_id": body.request_id,
            "score_from": work.score_from,
            "num_positions": work.num_positions,
            "token_logprobs": _floats(result.token_logprobs),
            "topk_ids": result.topk_ids.tolist(),
            "topk_logprobs": _floats(result.topk_logprobs),
            "tail_logprobs": _floats(result.tail_logprobs),
        }
        if result.full_logprobs is not None:
            out["full_logprobs"] = _floats(result.full_logprobs)
        return JSONResponse(out)

    return router
