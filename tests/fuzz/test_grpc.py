"""Fuzzing `Score`, `ScoreStream`, `Generate` and raw request bytes over real gRPC (oracles: `oracles.teacher_rpcs`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from protos import teacher_pb2_grpc as pb_grpc
from tests.fuzz.oracles import teacher_rpcs as g

pytestmark = pytest.mark.timeout(180)

FUZZ = settings.get_profile("opd-fuzz")


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.TeacherStub(channel)


def test_score_answers_every_request_with_a_status(fuzz_teacher, stub, limits):
    @FUZZ
    @given(g.score_cases(limits))
    def check(case):
        assert g.run_score(stub, case, limits)[0] in g.ANSWERED

    check()


def test_score_stream_answers_every_request_exactly_once(fuzz_teacher, stub, limits):
    @FUZZ
    @given(g.stream_cases(limits))
    def check(case):
        assert len(g.run_stream(stub, case, limits)) == len(case.request)

    check()


def test_generate_answers_every_request_with_a_status(fuzz_teacher, stub, limits):
    @FUZZ
    @given(g.generate_cases(limits))
    def check(case):
        assert g.run_generate(stub, case, limits)[0] in g.ANSWERED

    check()


def test_garbage_mutated_and_oversized_bytes_get_a_status(fuzz_teacher, channel, limits):
    @FUZZ
    @given(g.raw_cases(limits))
    def check(case):
        assert g.run_raw(channel, case, limits)[0] in g.ANSWERED

    check()


def test_the_oracles_catch_an_unmapped_status(fuzz_teacher, channel, limits):
    # The oracle itself can fail: a method the server does not have is answered UNIMPLEMENTED, which is not
    # in ANSWERED, so the check reports it instead of passing it.
    case = g.Case([b""], valid=False, method="Nope", extra=["garbage"])
    g._REPLY_TYPES["Nope"] = g.pb.InfoReply
    try:
        with pytest.raises(g.FuzzViolation, match="UNIMPLEMENTED"):
            g.run_raw(channel, case, limits)
    finally:
        del g._REPLY_TYPES["Nope"]


@pytest.mark.parametrize("shape", [[2**62, 4], [2**62, 0], [0, 2**63 - 1], [2**32, 2**32]])
def test_shapes_whose_element_count_overflows_are_invalid_arguments(fuzz_teacher, stub, shape):
    # int64 products wrap (2**62 * 4 == 0), and zero-size arrays with huge dimensions do not reshape.
    import grpc

    request = g.pb.ScoreRequest(token_ids=g.pb.PackedArray(dtype=g.pb.INT32, shape=shape, data=b""), score_from=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "token_ids" in info.value.details()
