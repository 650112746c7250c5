"""Fuzz cases and the oracle for the Redis record decoders (`protos.records.DECODERS`).

Inputs: any bytes; any msgpack value (maps with str and bytes keys, ints at
the 64-bit edges, NaN, nested containers, extension types); and valid
prompt / rollout / policy records with fields dropped, added, retyped or
resized. Oracle: a decoder returns its record type or raises `RecordError`
(which the stream consumer dead-letters) — never another exception — and a
record it returns encodes and decodes again to the same fields.
"""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import strategies as st

from protos.records import DECODERS, PolicyAnnouncement, PromptRecord, RecordError, RolloutRecord
from tests.fuzz.oracles.teacher_rpcs import FuzzViolation

_INT_EDGES = st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**64 - 1])
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    _INT_EDGES,
    st.floats(allow_subnormal=False),
    st.text(max_size=16),
    st.binary(max_size=24),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
_KEYS = st.one_of(st.sampled_from(["schema", "prompt_id", "meta", "reward", "version", "uri"]), st.text(max_size=8))
MSGPACK_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(_KEYS, st.binary(max_size=6)), inner, max_size=5),
    ),
    max_leaves=12,
)


def _valid_objects() -> dict[str, dict]:
    ids = np.arange(5, dtype="<i4")
    prompt = PromptRecord("p", group_size=2, prompt_ids=ids, answer="4", tools=[], meta={"k": 1})
    chat = PromptRecord("q", messages=[{"role": "user", "content": "hi"}])
    rollout = RolloutRecord(
        "p@1/0", "p", "g", 2, "train", ids, ids[:3], np.ones(3, "u1"), np.zeros(3, "<f4"), 1.0, 3, {"turns": 1}
    )
    policy = PolicyAnnouncement(3, "/ckpt/v3", step=3, created_at=1.5)
    return {
        "prompt": msgpack.unpackb(prompt.encode()),
        "chat": msgpack.unpackb(chat.encode()),
        "rollout": msgpack.unpackb(rollout.encode()),
        "policy": msgpack.unpackb(policy.encode()),
    }


_VALID = _valid_objects()


@st.composite
def mutated_records(draw) -> bytes:
    """A valid record's map with 1-3 edits: a field dropped, retyped, resized or added, the schema changed."""
    obj = dict(_VALID[draw(st.sampled_from(sorted(_VALID)))])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(obj, key=repr))) if obj else "schema"
        edit = draw(st.sampled_from(["drop", "retype", "resize", "add", "schema"]))
        if edit == "drop":
            obj.pop(key, None)
        elif edit == "retype":
            obj[key] = draw(MSGPACK_VALUES)
        elif edit == "resize" and isinstance(obj.get(key), bytes):
            obj[key] = obj[key][: draw(st.integers(0, len(obj[key])))] + draw(st.binary(max_size=5))
        elif edit == "add":
            obj[draw(st.one_of(_KEYS, st.binary(min_size=1, max_size=6)))] = draw(MSGPACK_VALUES)
        else:
            obj["schema"] = draw(st.one_of(_INT_EDGES, st.just(1.0), st.just(True), st.just("1")))
    return msgpack.packb(obj, use_bin_type=draw(st.booleans()))


def record_payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        MSGPACK_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        mutated_records(),
    )


def run_decoders(data: bytes) -> list[str]:
    """Decode `data` with every decoder; one status per decoder: `decoded` or `RecordError`."""
    statuses = []
    for kind, decode in DECODERS.items():
        try:
            record = decode(data)
        except RecordError as exc:
            if not str(exc).strip():
                raise FuzzViolation(f"{kind} decoder: RecordError without a message for {data[:80]!r}") from None
            statuses.append("RecordError")
            continue
        except Exception as exc:  # the oracle: anything but RecordError is a bug
            raise FuzzViolation(f"{kind} decoder raised {type(exc).__name__}: {exc} for {data[:120]!r}") from exc
        try:
            again = decode(record.encode())
        except Exception as exc:
            raise FuzzViolation(f"{kind}: decoded {record!r:.200} does not encode and decode again: {exc}") from exc
        if _fields(again) != _fields(record):
            raise FuzzViolation(f"{kind}: round trip changed {record!r:.200} into {again!r:.200}")
        statuses.append("decoded")
    return statuses


def _fields(record: object) -> dict[str, bytes]:
    """Each field as bytes (arrays: dtype + data; the rest: msgpack, so NaN equals NaN)."""
    return {
        name: value.dtype.str.encode() + value.tobytes()
        if isinstance(value, np.ndarray)
        else msgpack.packb(value, use_bin_type=True)
        for name, value in vars(record).items()
    }
