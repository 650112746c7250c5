"""`TeacherInfo` is the one definition of the teacher's Info: its fields are the InfoReply fields."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.descriptor import FieldDescriptor

from opd import __version__
from protos import teacher_pb2 as pb
from teacher_server import client
from teacher_server.info import TeacherInfo

pytestmark = pytest.mark.timeout(30)

_PY_TYPES = {FieldDescriptor.TYPE_STRING: "str", FieldDescriptor.TYPE_UINT32: "int", FieldDescriptor.TYPE_BOOL: "bool"}


def _info(**overrides) -> TeacherInfo:
    values = dict(
        model_name="m",
        backend="hf",
        vocab_size=384,
        tokenizer_fingerprint="ab" * 32,
        max_model_len=512,
        max_top_k=64,
        supports_full_vocab=True,
        supports_temperature=False,
        dtype="bfloat16",
    )
    return TeacherInfo(**{**values, **overrides})


def test_fields_are_the_info_reply_fields_in_order_and_type():
    wire = [(f.name, _PY_TYPES[f.type]) for f in pb.InfoReply.DESCRIPTOR.fields]
    ours = [(f.name, f.type) for f in dataclasses.fields(TeacherInfo)]
    assert ours == wire


def test_reply_round_trip_keeps_every_field():
    info = _info(server_version="9.9.9", supports_temperature=True)  # no proto3 default: every field is set
    reply = info.to_reply()
    assert {f.name for f, _ in reply.ListFields()} == {f.name for f in dataclasses.fields(TeacherInfo)}
    assert TeacherInfo.from_reply(reply) == info


def test_engines_leave_the_server_version_to_the_serving_process():
    assert _info().server_version == __version__


def test_the_client_returns_the_same_type():
    assert client.TeacherInfo is TeacherInfo
