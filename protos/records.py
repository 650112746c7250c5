"""The msgpack records that cross Redis: prompt record, rollout record, policy announcement.

Owns their field lists, schema versions and codecs; this module is their specification.
Every record is a msgpack map with an integer `schema`; token arrays travel as
raw little-endian bytes (int32 ids, uint8 mask, float32 log-probs), never as
lists. Decoding is the validation boundary: a wrong schema version, a missing
or mistyped field, an unknown field or arrays of unequal length raise
`RecordError` naming the field and saying what was expected, so the Redis
consumer can dead-letter the entry instead of crashing.

Imports numpy and msgpack only (no torch, no component).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# Schema 2 of prompt and rollout records added the optional `teacher` (the prompt's domain, which picks the
# teacher that scores its rollouts); schema 1 records still decode (teacher None).
# Schema 3 of rollout records added `sampling_temperature` and `sampling_top_p` (the worker's sampling settings,
# which the trainer checks against its loss); schema 1 and 2 records still decode, with both None ("not
# recorded": the trainer cannot check them and says so once in its log).
# Schema 3 of prompt records added `sampling_temperature`, `sampling_top_p` and `sampling_top_k` (settings the
# workers sample this prompt with instead of their own, e.g. an eval round's; nil = the worker's); schema 1 and 2
# records still decode with all three None.
PROMPT_SCHEMA = 3
ROLLOUT_SCHEMA = 3
POLICY_SCHEMA = 2
READ_SCHEMAS = {"prompt record": (1, 2, 3), "rollout record": (1, 2, 3), "policy announcement": (1, 2)}
SPLITS = ("train", "eval")
_TEACHER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_INT32 = np.dtype("<i4")
_UINT8 = np.dtype("u1")
_FLOAT32 = np.dtype("<f4")


class RecordError(ValueError):
    """A record is malformed or has a schema version this code does not read; the message names the field."""


# ---------------------------------------------------------------------------------------------- field checks


def _unpack_map(data: bytes, kind: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise RecordError(f"{kind}: payload is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{kind}: payload must be a msgpack map, got {type(obj).__name__}")
    return obj


def _pack_map(obj: dict[str, Any]) -> bytes:
    """`obj` as msgpack bytes (str as str, bytes as bin)."""
    data = msgpack.packb(obj, use_bin_type=True)
    assert data is not None  # packb returns None only for a Packer built with autoreset=False
    return data


def _check_schema(obj: Mapping[str, Any], kind: str) -> int:
    """The record's schema version, one of those this build reads (READ_SCHEMAS); RecordError otherwise."""
    schema, readable = obj.get("schema"), READ_SCHEMAS[kind]
    if type(schema) is not int or schema not in readable:  # 1.0 and True equal 1 but are not schema 1
        versions = " or ".join(str(v) for v in readable)
        raise RecordError(
            f"{kind}.schema: this build reads schema {versions}, got {schema!r}; "
            f"run producer and consumer from the same opd version"
        )
    return schema


def _teacher(obj: Mapping[str, Any], kind: str) -> str | None:
    """The optional `teacher` domain name (schema >= 2)."""
    name = _typed(obj, kind, "teacher", (str,), nullable=True)
    if name is not None and not _TEACHER_NAME.match(name):
        raise RecordError(f"{kind}.teacher: expected 1-64 of [A-Za-z0-9_.-], got {name!r:.80}")
    return name


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _sampling(obj: Mapping[str, Any], kind: str, name: str, upper: float | None) -> float | None:
    """An optional sampling setting (schema >= 3): a positive number (at most `upper`), or nil."""
    value = _typed(obj, kind, name, (float, int), nullable=True)
    if value is None:
        return None
    if not value > 0 or (upper is not None and value > upper) or value != value or value == float("inf"):
        bound = f"in (0, {upper:g}]" if upper is not None else "> 0 and finite"
        raise RecordError(f"{kind}.{name}: must be {bound}, got {value!r}")
    return float(value)


def _check_keys(obj: Mapping[str, Any], kind: str, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise RecordError(f"{kind}: missing field(s) {', '.join(missing)}")
    # Keys may be str or bytes (msgpack raw strings): sort and name them by their repr, never compare the two.
    unknown = sorted(obj.keys() - required - optional - {"schema"}, key=repr)
    if unknown:
        names = ", ".join(k if isinstance(k, str) else repr(k) for k in unknown)
        raise RecordError(f"{kind}: unknown field(s) {names} (schema {obj['schema']})")


def _typed(obj: Mapping[str, Any], kind: str, name: str, types: tuple[type, ...], *, nullable: bool = False) -> Any:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types) + (" or nil" if nullable else "")
        raise RecordError(f"{kind}.{name}: expected {wanted}, got {type(value).__name__} {value!r:.60}")
    return value


def _array(obj: Mapping[str, Any], kind: str, name: str, dtype: np.dtype) -> np.ndarray:
    raw = obj.get(name)
    if not isinstance(raw, bytes | bytearray):
        raise RecordError(f"{kind}.{name}: expected raw bytes of {dtype.name}, got {type(raw).__name__}")
    if len(raw) % dtype.itemsize:
        raise RecordError(
            f"{kind}.{name}: {len(raw)} bytes is not a whole number of {dtype.name} ({dtype.itemsize} bytes each)"
        )
    return np.frombuffer(raw, dtype=dtype)


def _to_bytes(values: Any, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(values), dtype=dtype).tobytes()


def _split(obj: Mapping[str, Any], kind: str) -> str:
    split = _typed(obj, kind, "split", (str,))
    if split not in SPLITS:
        raise RecordError(f"{kind}.split: expected one of {SPLITS}, got {split!r}")
    return split


def _positive_int(obj: Mapping[str, Any], kind: str, name: str, minimum: int) -> int:
    value = _typed(obj, kind, name, (int,))
    if value < minimum:
        raise RecordError(f"{kind}.{name}: must be >= {minimum}, got {value}")
    return value


def _messages(obj: Mapping[str, Any], kind: str) -> list[dict[str, Any]] | None:
    messages = _typed(obj, kind, "messages", (list,), nullable=True)
    for i, message in enumerate(messages or []):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RecordError(f"{kind}.messages[{i}]: expected a map with a string `role`, got {message!r:.80}")
        if not isinstance(message.get("content", ""), str):
            raise RecordError(f"{kind}.messages[{i}].content: expected a string")
    return messages


# ---------------------------------------------------------------------------------------------- prompt record


@dataclass
class PromptRecord:
    """One prompt to sample `group_size` answers for; either chat `messages` or raw `prompt_ids` (int32)."""

    prompt_id: str
    group_size: int = 1
    split: str = "train"
    messages: list[dict[str, Any]] | None = None
    prompt_ids: np.ndarray | None = None
    answer: str | None = None
    tools: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # domain name: which of several teachers scores this prompt's rollouts
    # sampling settings for this prompt (schema 3; None = the worker's own), e.g. an eval round's
    sampling_temperature: float | None = None
    sampling_top_p: float | None = None
    sampling_top_k: int | None = None  # -1 = off

    def encode(self) -> bytes:
        if (self.messages is None) == (self.prompt_ids is None):
            raise RecordError(f"prompt {self.prompt_id!r}: set exactly one of messages and prompt_ids")
        obj: dict[str, Any] = {
            "schema": PROMPT_SCHEMA,
            "prompt_id": self.prompt_id,
            "group_size": self.group_size,
            "split": self.split,
            "answer": self.answer,
            "tools": self.tools,
            "meta": self.meta,
            "teacher": self.teacher,
            "sampling_temperature": _optional_float(self.sampling_temperature),
            "sampling_top_p": _optional_float(self.sampling_top_p),
            "sampling_top_k": self.sampling_top_k,
        }
        if self.messages is not None:
            obj["messages"] = self.messages
        else:
            obj["prompt_ids"] = _to_bytes(self.prompt_ids, _INT32)
        return _pack_map(obj)

    @classmethod
    def decode(cls, data: bytes) -> PromptRecord:
        kind = "prompt record"
        obj = _unpack_map(data, kind)
        schema = _check_schema(obj, kind)
        optional = {"messages", "prompt_ids", "answer", "tools", "meta"} | ({"teacher"} if schema >= 2 else set())
        optional |= {"sampling_temperature", "sampling_top_p", "sampling_top_k"} if schema >= 3 else set()
        _check_keys(obj, kind, {"prompt_id", "group_size", "split"}, optional)
        messages = _messages(obj, kind)
        prompt_ids = _array(obj, kind, "prompt_ids", _INT32) if obj.get("prompt_ids") is not None else None
        if (messages is None) == (prompt_ids is None):
            raise RecordError(f"{kind}: exactly one of messages and prompt_ids must be set")
        return cls(
            prompt_id=_typed(obj, kind, "prompt_id", (str,)),
            group_size=_positive_int(obj, kind, "group_size", 1),
            split=_split(obj, kind),
            messages=messages,
            prompt_ids=prompt_ids,
            answer=_typed(obj, kind, "answer", (str,), nullable=True),
            tools=_typed(obj, kind, "tools", (list,), nullable=True),
            meta=_typed(obj, kind, "meta", (dict,), nullable=True) or {},
            teacher=_teacher(obj, kind),
            sampling_temperature=_sampling(obj, kind, "sampling_temperature", None),
            sampling_top_p=_sampling(obj, kind, "sampling_top_p", 1.0),
            sampling_top_k=_top_k(obj, kind),
        )


def _top_k(obj: Mapping[str, Any], kind: str) -> int | None:
    """The optional `sampling_top_k` (schema >= 3): -1 (off), a positive integer, or nil."""
    value = _typed(obj, kind, "sampling_top_k", (int,), nullable=True)
    if value is not None and value != -1 and value < 1:
        raise RecordError(f"{kind}.sampling_top_k: must be -1 (off) or >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- rollout record


@dataclass
class RolloutRecord:
    """One sampled response. Arrays: prompt_ids int32 [P]; response_ids int32, response_mask uint8
    (1 = model-generated, 0 = tool/environment) and behaviour_logprobs float32 (after temperature;
    0 on tool tokens), all [T]."""

    rollout_id: str
    prompt_id: str
    group_id: str
    group_size: int
    split: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    behaviour_logprobs: np.ndarray
    reward: float | None = None
    policy_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # the prompt's domain: which of several teachers scores it (None: the default)
    sampling_temperature: float | None = None  # the sampler's temperature (None: not recorded, schema < 3)
    sampling_top_p: float | None = None  # the sampler's nucleus mass, 1 = off (None: not recorded, schema < 3)

    @property
    def num_response_tokens(self) -> int:
        return int(len(self.response_ids))

    @property
    def num_generated_tokens(self) -> int:
        return int(np.count_nonzero(self.response_mask))

    def encode(self) -> bytes:
        n = len(self.response_ids)
        if len(self.response_mask) != n or len(self.behaviour_logprobs) != n:
            raise RecordError(
                f"rollout {self.rollout_id!r}: response_ids ({n}), response_mask "
                f"({len(self.response_mask)}) and behaviour_logprobs "
                f"({len(self.behaviour_logprobs)}) must have equal length"
            )
        return _pack_map(
            {
                "schema": ROLLOUT_SCHEMA,
                "rollout_id": self.rollout_id,
                "prompt_id": self.prompt_id,
                "group_id": self.group_id,
                "group_size": self.group_size,
                "split": self.split,
                "prompt_ids": _to_bytes(self.prompt_ids, _INT32),
                "response_ids": _to_bytes(self.response_ids, _INT32),
                "response_mask": _to_bytes(self.response_mask, _UINT8),
                "behaviour_logprobs": _to_bytes(self.behaviour_logprobs, _FLOAT32),
                "reward": None if self.reward is None else float(self.reward),
                "policy_version": int(self.policy_version),
                "meta": self.meta,
                "teacher": self.teacher,
                "sampling_temperature": _optional_float(self.sampling_temperature),
                "sampling_top_p": _optional_float(self.sampling_top_p),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> RolloutRecord:
        kind = "rollout record"
        obj = _unpack_map(data, kind)
        schema = _check_schema(obj, kind)
        _check_keys(
            obj,
            kind,
            {
                "rollout_id",
                "prompt_id",
                "group_id",
                "group_size",
                "split",
                "prompt_ids",
                "response_ids",
                "response_mask",
                "behaviour_logprobs",
                "policy_version",
            },
            {"reward", "meta"}
            | ({"teacher"} if schema >= 2 else set())
            | ({"sampling_temperature", "sampling_top_p"} if schema >= 3 else set()),
        )
        arrays = {
            name: _array(obj, kind, name, dtype)
            for name, dtype in (
                ("prompt_ids", _INT32),
                ("response_ids", _INT32),
                ("response_mask", _UINT8),
                ("behaviour_logprobs", _FLOAT32),
            )
        }
        lengths = {name: len(arrays[name]) for name in ("response_ids", "response_mask", "behaviour_logprobs")}
        if len(set(lengths.values())) != 1:
            raise RecordError(f"{kind}: response arrays must have equal length, got {lengths}")
        reward = _typed(obj, kind, "reward", (float, int), nullable=True)
        return cls(
            rollout_id=_typed(obj, kind, "rollout_id", (str,)),
            prompt_id=_typed(obj, kind, "prompt_id", (str,)),
            group_id=_typed(obj, kind, "group_id", (str,)),
            group_size=_positive_int(obj, kind, "group_size", 1),
            split=_split(obj, kind),
            reward=None if reward is None else float(reward),
            policy_version=_positive_int(obj, kind, "policy_version", 0),
            meta=_typed(obj, kind, "meta", (dict,), nullable=True) or {},
            teacher=_teacher(obj, kind),
            sampling_temperature=_sampling(obj, kind, "sampling_temperature", upper=None),
            sampling_top_p=_sampling(obj, kind, "sampling_top_p", upper=1.0),
            **arrays,
        )


# ---------------------------------------------------------------------------------------------- policy announcement


POLICY_KINDS = ("full", "lora")


@dataclass(frozen=True)
class PolicyAnnouncement:
    """A new student policy: `version` (monotonic), `uri` of its weights (a directory, optionally `file://`), the
    trainer `step` and `created_at` (unix seconds); schema 2 adds `kind`: `full` (a Hugging Face model
    directory) or `lora` (a peft adapter directory), and `base_id`, the identity of the base model a `lora`
    version applies to (`student_trainer.lora.base_identity`; empty for `full`). Schema 1 is `full`."""

    version: int
    uri: str
    step: int = 0
    created_at: float = 0.0
    kind: str = "full"
    base_id: str = ""

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise RecordError(f"policy announcement: kind {self.kind!r} is not one of {POLICY_KINDS}")
        if (self.kind == "lora") != bool(self.base_id):
            raise RecordError("policy announcement: base_id must be set for kind 'lora' and only for it")

    def encode(self) -> bytes:
        return _pack_map(
            {
                "schema": POLICY_SCHEMA,
                "version": int(self.version),
                "uri": self.uri,
                "step": int(self.step),
                "created_at": float(self.created_at),
                "kind": self.kind,
                "base_id": self.base_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> PolicyAnnouncement:
        kind = "policy announcement"
        obj = _unpack_map(data, kind)
        schema = _check_schema(obj, kind)
        optional = {"step", "created_at"} | ({"kind", "base_id"} if schema >= 2 else set())
        _check_keys(obj, kind, {"version", "uri"}, optional)
        return cls(
            version=_positive_int(obj, kind, "version", 0),
            uri=_typed(obj, kind, "uri", (str,)),
            step=_typed(obj, kind, "step", (int,), nullable=True) or 0,
            created_at=float(_typed(obj, kind, "created_at", (float, int), nullable=True) or 0.0),
            kind=_typed(obj, kind, "kind", (str,), nullable=True) or "full",
            base_id=_typed(obj, kind, "base_id", (str,), nullable=True) or "",
        )


Decoder = Callable[[bytes], Any]
DECODERS: dict[str, Decoder] = {
    "prompt": PromptRecord.decode,
    "rollout": RolloutRecord.decode,
    "policy": PolicyAnnouncement.decode,
}
