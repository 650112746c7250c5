"""Every request gets exactly one answer with a status: unexpected backend failures, malformed bytes, the
advertised length limit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack
from teacher_server.client import TeacherClientSync
from tests.fixtures.teacher import reference_logprobs, teacher_config

pytestmark = pytest.mark.timeout(180)

POISON = 13  # a request whose first token is this id fails inside the backend


def _faulty_engine(config):
    """The real hf backend, except that it returns a RuntimeError in the slot of every poisoned request,
    as vLLM does for a request it rejects (its other requests in the batch are scored)."""
    from teacher_server.engine_hf import HFEngine

    class FaultyEngine(HFEngine):
        async def score_batch(self, works):
            results = await super().score_batch(works)
            return [
                RuntimeError("injected backend failure") if int(w.token_ids[0]) == POISON else r
                for w, r in zip(works, results, strict=True)
            ]

    return FaultyEngine(config)


@pytest.fixture(scope="module")
def faulty_teacher(tiny_model_dir):
    from teacher_server.server import ServerThread

    config = teacher_config(tiny_model_dir, "hf")
    server = ServerThread(config, engine_factory=lambda: _faulty_engine(config)).start()
    yield server
    server.stop()


def _request(rid: str, ids: list[int]) -> pb.ScoreRequest:
    return pb.ScoreRequest(request_id=rid, token_ids=pack(np.asarray(ids), pb.INT32), score_from=1, top_k=2)


def test_a_backend_exception_in_a_stream_is_answered_internal_and_the_others_are_scored(faulty_teacher):
    requests = [_request("good-1", [1, 2, 3]), _request("poisoned", [POISON, 2, 3]), _request("good-2", [4, 5, 6])]
    before = faulty_teacher.server.metrics.registry.get_sample_value(
        "opd_teacher_internal_errors_total", {"rpc": "ScoreStream"}
    )
    with grpc.insecure_channel(faulty_teacher.address) as channel:
        # Before the fix the poisoned request got no reply and this call ran into its deadline.
        replies = list(pb_grpc.TeacherStub(channel).ScoreStream(iter(requests), timeout=30))
    assert sorted(r.request_id for r in replies) == ["good-1", "good-2", "poisoned"]  # exactly one reply each
    by_id = {r.request_id: r for r in replies}
    assert by_id["poisoned"].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "RuntimeError: injected backend failure" in by_id["poisoned"].error.message
    assert not by_id["good-1"].HasField("error") and by_id["good-1"].num_positions == 2
    assert not by_id["good-2"].HasField("error") and by_id["good-2"].num_positions == 2
    after = faulty_teacher.server.metrics.registry.get_sample_value(
        "opd_teacher_internal_errors_total", {"rpc": "ScoreStream"}
    )
    assert after == (before or 0) + 1


def test_a_backend_exception_in_score_is_internal_with_the_message(faulty_teacher):
    with grpc.insecure_channel(faulty_teacher.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request("poisoned", [POISON, 2, 3]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: injected backend failure" in err.value.details()
        assert stub.Score(_request("ok", [1, 2, 3]), timeout=30).num_positions == 2  # and it keeps serving


MALFORMED = b"\xff\xff\xff\xff"  # not a protobuf message: a field tag with a truncated varint


@pytest.mark.parametrize(
    "method,message_type",
    [("Score", "ScoreRequest"), ("Generate", "GenerateRequest"), ("Info", "InfoRequest")],
)
def test_bytes_that_are_not_the_request_message_are_invalid_argument(hf_teacher, method, message_type):
    with grpc.insecure_channel(hf_teacher.address) as channel:
        raw = channel.unary_unary(f"/opd.teacher.v1.Teacher/{method}")  # no serializer: the bytes go as they are
        with pytest.raises(grpc.RpcError) as err:
            raw(MALFORMED, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"opd.teacher.v1.{message_type}" in err.value.details()
        ok = pb_grpc.TeacherStub(channel).Score(_request("ok", [1, 2, 3]), timeout=30)
        assert ok.num_positions == 2


def test_malformed_bytes_in_a_stream_get_an_invalid_argument_reply_and_the_stream_continues(hf_teacher):
    good = _request("good", [1, 2, 3]).SerializeToString()
    with grpc.insecure_channel(hf_teacher.address) as channel:
        raw = channel.stream_stream(
            "/opd.teacher.v1.Teacher/ScoreStream", response_deserializer=pb.ScoreReply.FromString
        )
        replies = list(raw(iter([MALFORMED, good]), timeout=30))
    assert len(replies) == 2
    bad = next(r for r in replies if r.HasField("error"))
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "opd.teacher.v1.ScoreRequest" in bad.error.message
    assert next(r for r in replies if not r.HasField("error")).request_id == "good"


def _scores_exactly_max_model_len(server, model_dir):
    with TeacherClientSync(server.address, timeout_s=120) as client:
        info = client.info()
        ids = np.random.default_rng(3).integers(0, info.vocab_size, size=info.max_model_len).astype(np.int32)
        scores = client.score(ids, info.max_model_len - 4, top_k=2)
    ref = reference_logprobs(model_dir, ids)[-4:]
    # float32 forwards of the same weights: differences are summation-order rounding, ~1e-6 per nat here
    np.testing.assert_allclose(scores.token_logprobs, ref[np.arange(4), ids[-4:]], atol=1e-4)
    too_long = np.zeros(info.max_model_len + 1, np.int32)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.TeacherStub(channel).Score(
            pb.ScoreRequest(token_ids=pack(too_long, pb.INT32), score_from=1), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_model_len={info.max_model_len}" in err.value.details()


def test_hf_scores_exactly_its_advertised_max_model_len(hf_teacher, tiny_model_dir):
    _scores_exactly_max_model_len(hf_teacher, tiny_model_dir)


@pytest.mark.slow
def test_vllm_scores_exactly_its_advertised_max_model_len(vllm_teacher, tiny_model_dir):
    _scores_exactly_max_model_len(vllm_teacher, tiny_model_dir)


@pytest.mark.slow
def test_vllm_engine_is_started_one_token_longer_than_asked_when_the_model_allows(tiny_model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from teacher_server.engine_vllm import _engine_max_model_len

    # the tiny model has 512 positions: asking 256 starts the engine at 257 (Info then says 256); asking
    # the model's own limit starts it there (Info says 511); None lets vLLM take the model's limit
    for asked, engine in ((256, 257), (511, 512), (512, 512), (None, None)):
        args = AsyncEngineArgs(model=str(tiny_model_dir), max_model_len=asked, dtype="float32")
        assert _engine_max_model_len(args, asked) == engine
        assert args.max_model_len == asked  # the probe does not change the caller's arguments
