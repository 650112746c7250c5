"""The committed gRPC stubs are exactly what protos/teacher.proto compiles to."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_proto(tmp_path):
    from grpc_tools import protoc

    from protos import teacher_pb2, teacher_pb2_grpc

    out = tmp_path / "teacher.desc"
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", "protos/teacher.proto"])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(teacher_pb2.DESCRIPTOR.serialized_pb)
    for message in fresh.message_type:  # protoc adds the derived json_name; generated code omits it
        for field in message.field:
            field.ClearField("json_name")
    assert committed == fresh, "protos/teacher_pb2.py is stale: run `make protos` and commit the result"
    methods = {m.name for m in fresh.service[0].method}
    assert methods == {"Score", "ScoreStream", "Info", "Generate"}
    for name in methods:
        assert hasattr(teacher_pb2_grpc.TeacherServicer, name)
