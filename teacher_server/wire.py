"""The servicer's boundary: validating protobuf requests into engine work and encoding replies.

Every check names the field and the limit (`INVALID_ARGUMENT` via
`InvalidRequest`), so a client learns what to change. Inside the server,
work is trusted. JSON requests of the ops port are converted to the same
protobuf messages and pass through the same checks. Bytes that do not parse
as the request message are not an error of the gRPC layer here: the
servicer's deserializers (`lenient_parser`) turn them into `Malformed`, which
validation refuses like any other bad input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos import teacher_pb2 as pb
from protos.arrays import LOGPROB_DTYPES, ArrayError, dtype_name, pack, unpack
from teacher_server.engine import GenerateResult, GenerateWork, ScoreResult, ScoreWork
from teacher_server.errors import InvalidRequest
from teacher_server.info import TeacherInfo


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse as `message_type`; `check_parsed` refuses it."""

    message_type: str  # full protobuf name, e.g. opd.teacher.v1.ScoreRequest
    error: str
    # A ScoreStream answers every message, this one too: its reply carries no request id (none could be read).
    request_id: str = ""
    timeout_ms: int = 0


def lenient_parser(message_cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns `Malformed` instead of raising (gRPC would answer UNKNOWN)."""
    name = message_cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's: DecodeError, bad UTF-8
            return Malformed(name, f"{type(exc).__name__}: {exc}")

    return parse


def check_parsed(request: Any) -> None:
    """Raise InvalidRequest naming the message type when `request` is `Malformed`."""
    if isinstance(request, Malformed):
        raise InvalidRequest(
            f"the request bytes are not a valid {request.message_type} ({request.error}); send that message "
            f"serialized as protos/teacher.proto defines it"
        )


def _ids(packed: pb.PackedArray, field: str, info: TeacherInfo) -> np.ndarray:
    if not packed.shape and not packed.data:
        raise InvalidRequest(f"{field} is empty; send at least 2 token ids (int32)")
    if packed.dtype != pb.INT32:
        raise InvalidRequest(f"{field} must have dtype INT32, got {dtype_name(packed.dtype)}")
    try:
        ids = unpack(packed, field=field)
    except ArrayError as exc:
        raise InvalidRequest(str(exc)) from None
    if ids.ndim != 1:
        raise InvalidRequest(f"{field} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] > info.max_model_len:
        raise InvalidRequest(
            f"{field} has {ids.shape[0]} tokens; this teacher accepts at most max_model_len={info.max_model_len}"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= info.vocab_size):
        bad = int(ids[(ids < 0) | (ids >= info.vocab_size)][0])
        raise InvalidRequest(f"{field} contains id {bad} outside the vocabulary [0, {info.vocab_size})")
    return ids


def _logprob_dtype(dtype: int) -> int:
    dtype = dtype or pb.FLOAT32
    if dtype not in LOGPROB_DTYPES:
        raise InvalidRequest(f"logprob_dtype must be FLOAT32, FLOAT16 or BFLOAT16, got {dtype_name(dtype)}")
    return dtype


def _temperature(value: float, info: TeacherInfo, field: str = "temperature") -> float:
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(f"{field} must be a finite number > 0, got {value}")
    if value != 1.0 and not info.supports_temperature:
        raise InvalidRequest(
            f"{field}={value} is not supported by the {info.backend} backend (it returns "
            f"temperature-1 prompt log-probs and cannot rescale them exactly); "
            f"use temperature 1 or a teacher running --backend hf"
        )
    return float(value)


def score_work(request: pb.ScoreRequest, info: TeacherInfo) -> ScoreWork:
    """Validate a ScoreRequest against the engine's limits."""
    check_parsed(request)
    ids = _ids(request.token_ids, "token_ids", info)
    length = int(ids.shape[0])
    if length < 2:
        raise InvalidRequest(f"token_ids has {length} token(s); scoring needs at least 2 (a context and a target)")
    if not 1 <= request.score_from < length:
        raise InvalidRequest(
            f"score_from={request.score_from} is out of range; it must be in [1, {length - 1}] "
            f"for {length} token_ids (position 0 has no context)"
        )
    if request.top_k > info.max_top_k:
        raise InvalidRequest(f"top_k={request.top_k} exceeds this teacher's max_top_k={info.max_top_k}")
    if request.top_k > info.vocab_size:
        raise InvalidRequest(f"top_k={request.top_k} exceeds the vocabulary size {info.vocab_size}")
    if request.full_vocab and not info.supports_full_vocab:
        raise InvalidRequest(
            "full_vocab=true is not allowed by this teacher (start it with "
            "--engine-allow-full-vocab); ask for top_k instead"
        )
    _logprob_dtype(request.logprob_dtype)
    temperature = _temperature(request.temperature if request.HasField("temperature") else 1.0, info)
    return ScoreWork(
        token_ids=np.ascontiguousarray(ids, dtype=np.int32),
        score_from=int(request.score_from),
        top_k=int(request.top_k),
        full_vocab=bool(request.full_vocab),
        temperature=temperature,
    )


def score_reply(request: pb.ScoreRequest, work: ScoreWork, result: ScoreResult) -> pb.ScoreReply:
    dtype = _logprob_dtype(request.logprob_dtype)
    reply = pb.ScoreReply(
        request_id=request.request_id,
        score_from=work.score_from,
        num_positions=work.num_positions,
        token_logprobs=pack(result.token_logprobs, dtype),
        topk_ids=pack(result.topk_ids, pb.INT32),
        topk_logprobs=pack(result.topk_logprobs, dtype),
        tail_logprobs=pack(result.tail_logprobs, dtype),
    )
    if result.full_logprobs is not None:
        reply.full_logprobs.CopyFrom(pack(result.full_logprobs, dtype))
    return reply


def generate_work(request: pb.GenerateRequest, info: TeacherInfo) -> GenerateWork:
    check_parsed(request)
    ids = _ids(request.prompt_ids, "prompt_ids", info)
    if ids.shape[0] < 1:
        raise InvalidRequest("prompt_ids is empty; send at least 1 token id")
    if request.max_tokens < 1:
        raise InvalidRequest("max_tokens must be >= 1")
    if ids.shape[0] + request.max_tokens > info.max_model_len:
        raise InvalidRequest(
            f"prompt ({ids.shape[0]}) + max_tokens ({request.max_tokens}) exceeds max_model_len={info.max_model_len}"
        )
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    bad_stop = [t for t in request.stop_token_ids if not 0 <= t < info.vocab_size]
    if bad_stop:
        raise InvalidRequest(f"stop_token_ids contains {bad_stop[0]} outside the vocabulary [0, {info.vocab_size})")
    _logprob_dtype(request.logprob_dtype)
    return GenerateWork(
        prompt_ids=np.ascontiguousarray(ids, dtype=np.int32),
        max_tokens=int(request.max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=request.seed if request.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in request.stop_token_ids),
    )


def generate_reply(request: pb.GenerateRequest, result: GenerateResult) -> pb.GenerateReply:
    return pb.GenerateReply(
        request_id=request.request_id,
        token_ids=pack(result.token_ids, pb.INT32),
        logprobs=pack(result.logprobs, _logprob_dtype(request.logprob_dtype)),
        finish_reason=result.finish_reason,
    )
