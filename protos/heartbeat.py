"""The value of a consumer's heartbeat key (`{stream}:alive:{group}:{consumer}`, `opd.stream_heartbeat`).

Owns its fields, schema versions and codec. Schema 1 is a msgpack map `{"schema": 1, "policy_version": int | nil}`:
the policy version the consumer (a rollout worker) has loaded and samples from, nil when it does not say (not a
sampler). The trainer's prompt feeder admits prompts by the oldest live worker's version (docs/architecture.md).
Schema 0 is the value before it: the bare string `1`, still read (no version). Decoding is the validation boundary:
anything else raises `RecordError` naming what is wrong.

Imports msgpack only (no torch, no component).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from protos.records import RecordError

HEARTBEAT_SCHEMA = 1
HEARTBEAT_READ_SCHEMAS = (0, 1)  # 0: the bare "1" written before schema 1
_LEGACY = b"1"
_KIND = "worker heartbeat"


@dataclass(frozen=True)
class WorkerHeartbeat:
    policy_version: int | None = None  # the version loaded and sampled from; None: not said

    def encode(self) -> bytes:
        data = msgpack.packb({"schema": HEARTBEAT_SCHEMA, "policy_version": self.policy_version}, use_bin_type=True)
        assert data is not None
        return data

    @classmethod
    def decode(cls, data: bytes) -> WorkerHeartbeat:
        if data == _LEGACY:
            return cls(None)
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
            raise RecordError(f"{_KIND}: value is neither '1' nor valid msgpack ({type(exc).__name__})") from None
        if not isinstance(obj, dict):
            raise RecordError(f"{_KIND}: value must be a msgpack map, got {type(obj).__name__}")
        schema = obj.get("schema")
        if type(schema) is not int or schema not in HEARTBEAT_READ_SCHEMAS[1:]:
            raise RecordError(
                f"{_KIND}.schema: this build reads schema {HEARTBEAT_READ_SCHEMAS}, got {schema!r}; "
                "upgrade the trainer to read newer workers"
            )
        unknown = sorted(set(obj) - {"schema", "policy_version"}, key=repr)
        if unknown:
            raise RecordError(f"{_KIND}: unknown field(s) {unknown} (schema {schema})")
        version = obj.get("policy_version")
        if version is not None and (type(version) is not int or version < 0):
            raise RecordError(f"{_KIND}.policy_version: expected a non-negative int or nil, got {version!r}")
        return cls(version)
