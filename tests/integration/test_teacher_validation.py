"""Every malformed request gets INVALID_ARGUMENT naming the field and the limit; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack

pytestmark = pytest.mark.timeout(120)


def _ids(values, dtype=pb.INT32):
    return pack(np.asarray(values), dtype)


BAD_SCORE_REQUESTS = [
    ("empty input", pb.ScoreRequest(score_from=1), "token_ids is empty"),
    ("one token", pb.ScoreRequest(token_ids=_ids([5]), score_from=1), "at least 2"),
    (
        "id above vocab",
        pb.ScoreRequest(token_ids=_ids([1, 2, 384]), score_from=1),
        "id 384 outside the vocabulary [0, 384)",
    ),
    ("negative id", pb.ScoreRequest(token_ids=_ids([1, -3, 2]), score_from=1), "id -3 outside the vocabulary"),
    ("too long", pb.ScoreRequest(token_ids=_ids(np.ones(513)), score_from=1), "max_model_len=512"),
    ("score_from 0", pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=0), "score_from=0 is out of range"),
    ("score_from = len", pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=3), "score_from=3 is out of range"),
    ("top_k too big", pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=1, top_k=65), "max_top_k=64"),
    ("float ids", pb.ScoreRequest(token_ids=_ids([1.0, 2.0], pb.FLOAT32), score_from=1), "dtype INT32"),
    ("2-D ids", pb.ScoreRequest(token_ids=_ids([[1, 2], [3, 4]]), score_from=1), "must be 1-D"),
    (
        "bytes do not match shape",
        pb.ScoreRequest(token_ids=pb.PackedArray(dtype=pb.INT32, shape=[4], data=b"\0" * 12), score_from=1),
        "needs 16 bytes, got 12",
    ),
    ("zero temperature", pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=1, temperature=0.0), "temperature"),
    (
        "bad logprob dtype",
        pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=1, logprob_dtype=pb.INT32),
        "logprob_dtype",
    ),
]


@pytest.mark.parametrize("name,request_,message", BAD_SCORE_REQUESTS, ids=[c[0] for c in BAD_SCORE_REQUESTS])
def test_bad_score_request_is_invalid_argument_and_server_keeps_serving(hf_teacher, name, request_, message):
    with grpc.insecure_channel(hf_teacher.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        ok = stub.Score(pb.ScoreRequest(token_ids=_ids([1, 2, 3, 4]), score_from=2, top_k=3), timeout=30)
        assert ok.num_positions == 2


def test_full_vocab_refused_when_not_allowed(tiny_model_dir):
    from tests.fixtures.teacher import start_teacher

    server = start_teacher(tiny_model_dir, "hf", engine={"allow_full_vocab": False})
    try:
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.TeacherStub(channel).Score(
                pb.ScoreRequest(token_ids=_ids([1, 2, 3]), score_from=1, full_vocab=True), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--engine-allow-full-vocab" in err.value.details()
    finally:
        server.stop()


def test_bad_request_in_a_stream_gets_an_error_reply_and_the_stream_continues(hf_teacher):
    requests = [
        pb.ScoreRequest(request_id="good-1", token_ids=_ids([1, 2, 3]), score_from=1),
        pb.ScoreRequest(request_id="bad", token_ids=_ids([1, 999]), score_from=1),
        pb.ScoreRequest(request_id="good-2", token_ids=_ids([4, 5, 6, 7]), score_from=2, top_k=2),
    ]
    with grpc.insecure_channel(hf_teacher.address) as channel:
        replies = {r.request_id: r for r in pb_grpc.TeacherStub(channel).ScoreStream(iter(requests), timeout=60)}
    assert set(replies) == {"good-1", "bad", "good-2"}
    assert replies["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "id 999 outside the vocabulary" in replies["bad"].error.message
    assert not replies["good-1"].HasField("error") and replies["good-1"].num_positions == 2
    assert replies["good-2"].num_positions == 2


BAD_GENERATE_REQUESTS = [
    ("no prompt", pb.GenerateRequest(max_tokens=3), "prompt_ids is empty"),
    ("zero max_tokens", pb.GenerateRequest(prompt_ids=_ids([1, 2]), max_tokens=0), "max_tokens must be >= 1"),
    ("past max_model_len", pb.GenerateRequest(prompt_ids=_ids(np.ones(500)), max_tokens=20), "max_model_len=512"),
    ("top_p 0", pb.GenerateRequest(prompt_ids=_ids([1, 2]), max_tokens=2, top_p=0.0), "top_p"),
    ("negative temperature", pb.GenerateRequest(prompt_ids=_ids([1, 2]), max_tokens=2, temperature=-1), "temperature"),
    (
        "stop id outside vocab",
        pb.GenerateRequest(prompt_ids=_ids([1, 2]), max_tokens=2, stop_token_ids=[400]),
        "stop_token_ids contains 400",
    ),
]


@pytest.mark.parametrize("name,request_,message", BAD_GENERATE_REQUESTS, ids=[c[0] for c in BAD_GENERATE_REQUESTS])
def test_bad_generate_request_is_invalid_argument(hf_teacher, name, request_, message):
    with grpc.insecure_channel(hf_teacher.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.TeacherStub(channel).Generate(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
