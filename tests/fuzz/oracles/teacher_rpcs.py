"""Fuzz cases and oracles for the teacher's gRPC surface: `Score`, `ScoreStream`, `Generate`, raw bytes.

Owns the `hypothesis` strategies (well-formed requests inside the server's
limits, and adversarial ones: ids outside the vocabulary or int32, every dtype
number, shapes that do not match the bytes, huge or zero `score_from`/`top_k`,
NaN/inf/subnormal temperatures, tiny deadlines, garbage and oversized bytes)
and the oracles: every input is answered with a status from `ANSWERED`, a
refusal says what is wrong, a request valid by construction is not refused as
invalid, and an OK reply has the shapes and dtypes asked for. Each `run_*`
returns the status names it saw and raises `FuzzViolation` otherwise. Used by
`opd bench fuzz` and `tests/fuzz/`; starts no server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import strategies as st

from protos import teacher_pb2 as pb
from protos.arrays import ArrayError, pack, unpack

# A status an input may get: answered and understood. UNKNOWN (an exception nobody mapped), INTERNAL and the
# rest mean a bug. RESOURCE_EXHAUSTED: queue full, or a message over the server's size limit.
ANSWERED = frozenset({"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
SERVICE = "/opd.teacher.v1.Teacher/"
METHODS = ("Score", "ScoreStream", "Generate", "Info")
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class FuzzViolation(AssertionError):
    """The server's answer broke an oracle; the message names the input and the answer."""


@dataclass(frozen=True)
class Limits:
    """What the fuzzed teacher accepts (its Info) and its message size limit."""

    vocab_size: int
    max_model_len: int
    max_top_k: int
    max_message_bytes: int


@dataclass
class Case:
    """One input: the request (or raw bytes), whether it is valid by construction, and the client deadline."""

    request: object
    valid: bool
    deadline_s: float = 30.0
    method: str = ""
    extra: list = field(default_factory=list)


# -- strategies ------------------------------------------------------------------------------------------

_U32 = st.one_of(st.integers(0, 80), st.integers(0, 2**32 - 1))
_ANY_DTYPE = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))
# NaN, +-inf, +-0 included; no subnormals: a library loaded in the same process (torch, vLLM) may set
# flush-to-zero, under which hypothesis refuses to generate them
_ANY_FLOAT = st.floats(width=32, allow_subnormal=False)
_DEADLINES = st.sampled_from([30.0] * 8 + [0.001, 0.02])


def _packed(dtype: int, shape: list[int], data: bytes) -> pb.PackedArray:
    return pb.PackedArray(dtype=dtype, shape=shape, data=data)


def _adversarial_ids(limits: Limits) -> st.SearchStrategy[pb.PackedArray]:
    edges = st.sampled_from([-(2**31), -1, 0, limits.vocab_size - 1, limits.vocab_size, 2**31 - 1])
    ints = st.lists(st.one_of(edges, st.integers(-(2**31), 2**31 - 1)), max_size=limits.max_model_len + 4)
    shapes = st.lists(
        st.one_of(st.integers(-3, limits.max_model_len + 4), st.integers(-(2**63), 2**63 - 1)), max_size=4
    )
    return st.one_of(
        ints.map(lambda xs: pack(np.asarray(xs, dtype=np.int64).astype(np.int32), pb.INT32)),
        st.builds(_packed, _ANY_DTYPE, shapes, st.binary(max_size=4 * limits.max_model_len + 8)),
        st.builds(lambda xs, shape: _packed(pb.INT32, shape, np.asarray(xs, np.int32).tobytes()), ints, shapes),
        st.builds(lambda n: pack(np.zeros((n, 2), np.int32), pb.INT32), st.integers(0, 4)),
    )


def _valid_ids(limits: Limits, min_size: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, limits.vocab_size - 1), min_size=min_size, max_size=max_size)


@st.composite
def score_requests(draw, limits: Limits) -> Case:
    """A ScoreRequest, valid by construction half of the time."""
    request_id = draw(st.text(max_size=24))
    if draw(st.booleans()):
        ids = draw(_valid_ids(limits, 2, limits.max_model_len))
        request = pb.ScoreRequest(
            request_id=request_id,
            token_ids=pack(np.asarray(ids, np.int32), pb.INT32),
            score_from=draw(st.integers(1, len(ids) - 1)),
            top_k=draw(st.integers(0, limits.max_top_k)),
            full_vocab=draw(st.booleans()),
            logprob_dtype=draw(st.sampled_from([0, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])),
        )
        if draw(st.booleans()):
            request.temperature = draw(st.floats(0.0625, 20.0, width=32, allow_subnormal=False))
        return Case(request, valid=True)
    request = pb.ScoreRequest(
        request_id=request_id,
        token_ids=draw(_adversarial_ids(limits)),
        score_from=draw(_U32),
        top_k=draw(_U32),
        full_vocab=draw(st.booleans()),
        logprob_dtype=draw(_ANY_DTYPE),
        timeout_ms=draw(_U32),
    )
    if draw(st.booleans()):
        request.temperature = draw(_ANY_FLOAT)
    return Case(request, valid=False)


def score_cases(limits: Limits) -> st.SearchStrategy[Case]:
    """A unary Score call: a request and a client deadline (some too short to be met)."""
    return st.builds(
        lambda case, deadline: Case(case.request, case.valid, deadline), score_requests(limits), _DEADLINES
    )


@st.composite
def stream_cases(draw, limits: Limits) -> Case:
    """1-6 requests on one ScoreStream; request ids unique, or drawn from a few (duplicates allowed)."""
    cases = draw(st.lists(score_requests(limits), min_size=1, max_size=6))
    shared_ids = draw(st.booleans())
    for i, case in enumerate(cases):
        case.request.request_id = draw(st.sampled_from(["", "a", "b"])) if shared_ids else f"r{i}"
    return Case([c.request for c in cases], valid=False, extra=[c.valid for c in cases])


@st.composite
def generate_cases(draw, limits: Limits) -> Case:
    if draw(st.booleans()):
        ids = draw(_valid_ids(limits, 1, limits.max_model_len - 1))
        request = pb.GenerateRequest(
            request_id=draw(st.text(max_size=24)),
            prompt_ids=pack(np.asarray(ids, np.int32), pb.INT32),
            max_tokens=draw(st.integers(1, min(8, limits.max_model_len - len(ids)))),
            temperature=draw(st.one_of(st.just(0.0), st.floats(0.125, 5.0, width=32, allow_subnormal=False))),
            top_p=draw(st.floats(0.0625, 1.0, width=32, allow_subnormal=False)),
            stop_token_ids=draw(st.lists(st.integers(0, limits.vocab_size - 1), max_size=3)),
            logprob_dtype=draw(st.sampled_from([0, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])),
        )
        if draw(st.booleans()):
            request.seed = draw(st.integers(-(2**63), 2**63 - 1))
        return Case(request, valid=True, deadline_s=draw(_DEADLINES))
    request = pb.GenerateRequest(
        request_id=draw(st.text(max_size=24)),
        prompt_ids=draw(_adversarial_ids(limits)),
        max_tokens=draw(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))),
        stop_token_ids=draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)),
        logprob_dtype=draw(_ANY_DTYPE),
    )
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(request, name, draw(_ANY_FLOAT))
    if draw(st.booleans()):
        request.seed = draw(st.integers(-(2**63), 2**63 - 1))
    return Case(request, valid=False, deadline_s=draw(_DEADLINES))


@st.composite
def raw_cases(draw, limits: Limits) -> Case:
    """Bytes sent as a request message: garbage, a valid message with bytes flipped, cut or appended, or a
    message one byte over the server's size limit."""
    method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(["garbage"] * 5 + ["mutated"] * 4 + ["oversized"]))
    if kind == "oversized":
        return Case([b"\x12" + b"\x00" * limits.max_message_bytes], valid=False, method=method, extra=["oversized"])
    payloads = []
    for _ in range(draw(st.integers(1, 3)) if method == "ScoreStream" else 1):
        if kind == "garbage":
            payloads.append(draw(st.binary(max_size=256)))
            continue
        source = draw(generate_cases(limits) if method == "Generate" else score_requests(limits))
        data = bytearray(source.request.SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "append"]))
            if op == "flip" and data:
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                data = data[: draw(st.integers(0, len(data)))]
            else:
                data += draw(st.binary(min_size=1, max_size=16))
        payloads.append(bytes(data))
    return Case(payloads, valid=False, method=method, extra=[kind])


# -- oracles ---------------------------------------------------------------------------------------------


def _brief(message: object) -> str:
    text = repr(message) if isinstance(message, bytes | list) else str(message).replace("\n", " ")
    return text[:300]


def _refusal(code: str, details: str, case_valid: bool, what: str) -> str:
    if code not in ANSWERED:
        raise FuzzViolation(f"{what} answered {code} ({details!r}); expected one of {sorted(ANSWERED)}")
    if code == "INVALID_ARGUMENT" and (case_valid or not details.strip()):
        reason = "a request valid by construction was refused" if case_valid else "no message says what is wrong"
        raise FuzzViolation(f"{what}: {reason}: {details!r}")
    return code


def check_score_reply(request: pb.ScoreRequest, reply: pb.ScoreReply, limits: Limits, what: str) -> None:
    try:
        length = unpack(request.token_ids).shape[0]
    except ArrayError:
        raise FuzzViolation(f"{what}: OK reply to a request whose token_ids do not decode: {_brief(request)}") from None
    p, k = length - request.score_from, request.top_k
    dtype = request.logprob_dtype or pb.FLOAT32
    shapes = {"token_logprobs": (p,), "topk_ids": (p, k), "topk_logprobs": (p, k), "tail_logprobs": (p,)}
    if request.full_vocab:
        shapes["full_logprobs"] = (p, limits.vocab_size)
    problems = [f"num_positions {reply.num_positions} != {p}"] if reply.num_positions != p else []
    for name, shape in shapes.items():
        array = getattr(reply, name)
        want_dtype = pb.INT32 if name == "topk_ids" else dtype
        if tuple(array.shape) != shape or array.dtype != want_dtype or unpack(array).shape != shape:
            problems.append(f"{name}: shape {tuple(array.shape)} dtype {array.dtype}, want {shape} dtype {want_dtype}")
    if not request.full_vocab and reply.HasField("full_logprobs"):
        problems.append("full_logprobs sent though not asked for")
    if problems:
        raise FuzzViolation(f"{what}: malformed OK reply to {_brief(request)}: {'; '.join(problems)}")


def run_score(stub, case: Case, limits: Limits) -> list[str]:
    try:
        reply = stub.Score(case.request, timeout=case.deadline_s)
    except grpc.RpcError as err:
        return [_refusal(err.code().name, err.details() or "", case.valid, f"Score({_brief(case.request)})")]
    check_score_reply(case.request, reply, limits, "Score")
    return ["OK"]


def run_stream(stub, case: Case, limits: Limits) -> list[str]:
    requests: list[pb.ScoreRequest] = case.request
    what = f"ScoreStream of {len(requests)} request(s)"
    try:
        replies = list(stub.ScoreStream(iter(requests), timeout=60))
    except grpc.RpcError as err:
        raise FuzzViolation(f"{what}: the stream failed with {err.code().name} ({err.details()!r})") from None
    sent, got = Counter(r.request_id for r in requests), Counter(r.request_id for r in replies)
    if sent != got:
        raise FuzzViolation(f"{what}: replies to ids {dict(got)} for requests with ids {dict(sent)}")
    valid_by_id: dict[str, list[bool]] = {}
    for request, valid in zip(requests, case.extra, strict=True):
        valid_by_id.setdefault(request.request_id, []).append(valid)
    codes = []
    for reply in replies:
        candidates = [r for r in requests if r.request_id == reply.request_id]
        if reply.HasField("error"):
            name = _CODE_NAMES.get(reply.error.code, f"code {reply.error.code}")
            codes.append(_refusal(name, reply.error.message, all(valid_by_id[reply.request_id]), what))
            continue
        errors = []
        for request in candidates:  # with duplicate ids, the reply must fit one of the requests that carry it
            try:
                check_score_reply(request, reply, limits, what)
                break
            except FuzzViolation as exc:
                errors.append(exc)
        else:
            raise errors[0]
        codes.append("OK")
    return codes


def run_generate(stub, case: Case, limits: Limits) -> list[str]:
    request: pb.GenerateRequest = case.request
    what = f"Generate({_brief(request)})"
    try:
        reply = stub.Generate(request, timeout=case.deadline_s)
    except grpc.RpcError as err:
        return [_refusal(err.code().name, err.details() or "", case.valid, what)]
    ids, logprobs = unpack(reply.token_ids), unpack(reply.logprobs)
    want_dtype = request.logprob_dtype or pb.FLOAT32
    if ids.ndim != 1 or not 1 <= len(ids) <= request.max_tokens or reply.token_ids.dtype != pb.INT32:
        raise FuzzViolation(f"{what}: token_ids of shape {ids.shape} for max_tokens={request.max_tokens}")
    if (
        logprobs.shape != ids.shape
        or reply.logprobs.dtype != want_dtype
        or reply.finish_reason not in ("stop", "length")
    ):
        raise FuzzViolation(f"{what}: logprobs {logprobs.shape} dtype {reply.logprobs.dtype}, {reply.finish_reason!r}")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise FuzzViolation(f"{what}: sampled ids outside the vocabulary: {ids.tolist()}")
    return ["OK"]


_REPLY_TYPES = {"Score": pb.ScoreReply, "Generate": pb.GenerateReply, "Info": pb.InfoReply}


def run_raw(channel: grpc.Channel, case: Case, limits: Limits) -> list[str]:
    what = f"{case.method} with {case.extra[0]} bytes {_brief(case.request[0][:64])}"
    try:
        if case.method == "ScoreStream":
            replies = list(channel.stream_stream(SERVICE + case.method)(iter(case.request), timeout=30))
            for data in replies:
                pb.ScoreReply.FromString(data)
        else:
            _REPLY_TYPES[case.method].FromString(
                channel.unary_unary(SERVICE + case.method)(case.request[0], timeout=30)
            )
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
    else:
        code, details = "OK", ""
    if case.extra[0] == "oversized" and code != "RESOURCE_EXHAUSTED":
        raise FuzzViolation(f"{what}: a message over the size limit got {code}, not RESOURCE_EXHAUSTED")
    return [_refusal(code, details, False, what)]
