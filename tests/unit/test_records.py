"""The msgpack records: round trips, and every malformed input rejected with the field named."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest

from protos.records import POLICY_SCHEMA, PolicyAnnouncement, PromptRecord, RecordError, RolloutRecord
from tests.fixtures.rollout import make_rollout

pytestmark = pytest.mark.timeout(60)


def _fields(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_rollout_round_trip_keeps_arrays_and_dtypes() -> None:
    record = make_rollout(3, num_tokens=11)
    decoded = RolloutRecord.decode(record.encode())
    assert decoded.rollout_id == record.rollout_id and decoded.policy_version == 3 and decoded.reward == 1.0
    for name, dtype in (
        ("prompt_ids", "<i4"),
        ("response_ids", "<i4"),
        ("response_mask", "u1"),
        ("behaviour_logprobs", "<f4"),
    ):
        assert getattr(decoded, name).dtype == np.dtype(dtype)
        np.testing.assert_array_equal(getattr(decoded, name), getattr(record, name))
    assert decoded.meta == {"worker": "test"}
    assert decoded.num_generated_tokens == 11


def test_rollout_arrays_travel_as_raw_little_endian_bytes() -> None:
    fields = _fields(make_rollout(0, num_tokens=4).encode())
    assert isinstance(fields["response_ids"], bytes) and len(fields["response_ids"]) == 16
    assert len(fields["response_mask"]) == 4 and len(fields["behaviour_logprobs"]) == 16
    assert fields["schema"] == 3


def test_prompt_round_trip_messages_and_ids() -> None:
    chat = PromptRecord(
        "p1",
        group_size=4,
        split="eval",
        messages=[{"role": "user", "content": "2+2?"}],
        answer="4",
        tools=["calculator"],
        meta={"row": 1},
    )
    assert PromptRecord.decode(chat.encode()) == chat
    ids = PromptRecord("p2", prompt_ids=np.array([1, 2, 3], np.int32))
    decoded = PromptRecord.decode(ids.encode())
    np.testing.assert_array_equal(decoded.prompt_ids, [1, 2, 3])
    assert decoded.messages is None and decoded.group_size == 1


def test_policy_round_trip() -> None:
    ann = PolicyAnnouncement(version=7, uri="file:///ckpt/v7", step=700, created_at=1.5)
    assert PolicyAnnouncement.decode(ann.encode()) == ann
    lora = PolicyAnnouncement(version=8, uri="/w/v8", step=8, kind="lora", base_id="sha256:ab")
    assert PolicyAnnouncement.decode(lora.encode()) == lora


def test_a_schema_1_policy_announcement_still_decodes_as_full_weights() -> None:
    ann = PolicyAnnouncement.decode(_pack({"schema": 1, "version": 3, "uri": "/w/v3", "step": 3, "created_at": 1.0}))
    assert (ann.version, ann.kind, ann.base_id) == (3, "full", "")
    with pytest.raises(RecordError, match="unknown field"):  # schema 1 had no kind
        PolicyAnnouncement.decode(_pack({"schema": 1, "version": 3, "uri": "/w/v3", "kind": "lora"}))


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"kind": "delta", "base_id": ""}, "kind 'delta' is not one of"),
        ({"kind": "lora", "base_id": ""}, "base_id must be set for kind 'lora'"),
        ({"kind": "full", "base_id": "sha256:ab"}, "base_id must be set for kind 'lora' and only for it"),
        ({"kind": 3, "base_id": ""}, "policy announcement.kind: expected str"),
    ],
)
def test_a_bad_policy_kind_or_base_is_a_record_error(fields, needle) -> None:
    with pytest.raises(RecordError, match=needle):
        PolicyAnnouncement.decode(_pack({"schema": POLICY_SCHEMA, "version": 3, "uri": "/w/v3", **fields}))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.update(schema=4), "rollout record.schema"),
        (lambda f: f.update(sampling_temperature=0.0), "sampling_temperature: must be > 0"),
        (lambda f: f.update(sampling_top_p=1.5), "sampling_top_p: must be in (0, 1]"),
        (lambda f: f.update(sampling_top_p="1"), "sampling_top_p: expected float or int or nil"),
        (lambda f: f.update(teacher="no spaces"), "rollout record.teacher"),
        (lambda f: f.update(teacher=3), "teacher: expected str"),
        (lambda f: f.pop("rollout_id"), "missing field(s) rollout_id"),
        (lambda f: f.update(policy_version="3"), "rollout record.policy_version: expected int"),
        (lambda f: f.update(policy_version=True), "policy_version: expected int"),
        (lambda f: f.update(policy_version=-1), "policy_version: must be >= 0"),
        (lambda f: f.update(group_size=0), "group_size: must be >= 1"),
        (lambda f: f.update(split="test"), "rollout record.split"),
        (lambda f: f.update(response_mask=b"\x01" * 3), "response arrays must have equal length"),
        (lambda f: f.update(behaviour_logprobs=b"\x00" * 7), "behaviour_logprobs: 7 bytes"),
        (lambda f: f.update(response_ids=[1, 2, 3, 4]), "response_ids: expected raw bytes"),
        (lambda f: f.update(reward="high"), "reward: expected float or int or nil"),
        (lambda f: f.update(meta=[1]), "meta: expected dict"),
        (lambda f: f.update(extra=1), "unknown field(s) extra"),
    ],
)
def test_malformed_rollout_names_the_field(mutate, needle) -> None:
    fields = _fields(make_rollout(0, num_tokens=4).encode())
    mutate(fields)
    with pytest.raises(RecordError, match=None) as err:
        RolloutRecord.decode(_pack(fields))
    assert needle in str(err.value)


@pytest.mark.parametrize("payload", [b"junk\xff", _pack([1, 2]), _pack({1: 2}), b""])
def test_non_map_payloads_are_record_errors(payload: bytes) -> None:
    with pytest.raises(RecordError, match="rollout record"):
        RolloutRecord.decode(payload)


def test_prompt_needs_exactly_one_of_messages_and_ids() -> None:
    base = {"schema": 1, "prompt_id": "p", "group_size": 1, "split": "train"}
    with pytest.raises(RecordError, match="exactly one of messages and prompt_ids"):
        PromptRecord.decode(_pack(base))
    with pytest.raises(RecordError, match=r"messages\[0\]"):
        PromptRecord.decode(_pack({**base, "messages": [{"content": "no role"}]}))
    with pytest.raises(RecordError, match="set exactly one"):
        PromptRecord("p").encode()


def test_encode_refuses_unequal_arrays() -> None:
    record = make_rollout(0, num_tokens=4)
    record.response_mask = np.ones(3, np.uint8)
    with pytest.raises(RecordError, match="equal length"):
        record.encode()


def test_policy_wrong_schema_says_which_version_is_read() -> None:
    with pytest.raises(RecordError, match=f"reads schema 1 or {POLICY_SCHEMA}, got 9"):
        PolicyAnnouncement.decode(_pack({"schema": 9, "version": 1, "uri": "x"}))


def test_records_import_without_torch() -> None:
    code = (
        "import sys, protos.records, opd.streams, opd.stream_consumer, opd.policy, opd.prompts; "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_teacher_domain_travels_and_schema_1_records_still_decode() -> None:
    prompt = PromptRecord("p", messages=[{"role": "user", "content": "2+2?"}], teacher="math")
    assert PromptRecord.decode(prompt.encode()).teacher == "math"
    rollout = make_rollout(1)
    rollout.teacher = "code"
    assert RolloutRecord.decode(rollout.encode()).teacher == "code"
    old = _fields(make_rollout(2).encode())  # as an opd of schema 1 wrote it: no teacher field
    old.pop("teacher")
    old.pop("sampling_temperature"), old.pop("sampling_top_p")  # schema 3's fields
    old["schema"] = 1
    decoded = RolloutRecord.decode(_pack(old))
    assert decoded.teacher is None and decoded.rollout_id == "p/2"
    old_prompt = {"schema": 1, "prompt_id": "p", "group_size": 1, "split": "train", "prompt_ids": b"\x01\x00\x00\x00"}
    assert PromptRecord.decode(_pack(old_prompt)).teacher is None
    with pytest.raises(RecordError, match="unknown field"):  # schema 1 has no teacher field
        RolloutRecord.decode(_pack({**old, "teacher": "math"}))
