"""The teacher's HTTP ops port: metrics that count what was just done, health, info, and the JSON slow path."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opd import __version__
from teacher_server.client import InvalidArgument, TeacherClientSync
from tests.fixtures.teacher import start_teacher

pytestmark = pytest.mark.timeout(120)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def fresh_teacher(tiny_model_dir):
    server = start_teacher(tiny_model_dir, "hf")
    yield server
    server.stop()


def test_metrics_scrape_parses_and_counts_the_requests_just_made(fresh_teacher):
    with TeacherClientSync(fresh_teacher.address, client_name="alice") as client:
        for _ in range(3):
            client.score(np.arange(1, 11), 4, top_k=2)  # 6 positions each
        with pytest.raises(InvalidArgument):
            client.score([1, 2], 5)
    samples = _samples(httpx.get(f"{fresh_teacher.ops_url}/metrics").text)
    ok = (("client", "alice"), ("code", "OK"), ("rpc", "ScoreStream"))
    bad = (("client", "alice"), ("code", "INVALID_ARGUMENT"), ("rpc", "ScoreStream"))
    assert samples[("opd_teacher_requests_total", ok)] == 3
    assert samples[("opd_teacher_requests_total", bad)] == 1
    assert samples[("opd_teacher_scored_tokens_total", (("client", "alice"),))] == 18
    assert samples[("opd_teacher_request_latency_seconds_count", (("client", "alice"), ("rpc", "ScoreStream")))] == 4
    assert samples[("opd_teacher_queue_wait_seconds_count", (("client", "alice"),))] == 3
    assert samples[("opd_teacher_batch_size_requests_count", ())] >= 1
    assert samples[("opd_teacher_engine_busy_seconds_total", ())] > 0
    assert samples[("opd_teacher_queue_depth_requests", ())] == 0
    assert samples[("opd_teacher_engine_ready", ())] == 1


def test_health_ready_and_info(hf_teacher):
    assert httpx.get(f"{hf_teacher.ops_url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{hf_teacher.ops_url}/readyz").status_code == 200
    info = httpx.get(f"{hf_teacher.ops_url}/v1/info").json()
    assert info["backend"] == "hf" and info["vocab_size"] == 384 and len(info["tokenizer_fingerprint"]) == 64
    with TeacherClientSync(hf_teacher.address) as client:
        assert info == dataclasses.asdict(client.info())  # JSON and gRPC answer the same TeacherInfo
    assert info["server_version"] == __version__


def _grpc_health(address: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_readyz_follows_grpc_health(fresh_teacher):
    """Kubernetes probes the ops port (/readyz): it must say what grpc.health.v1 says, both ways."""
    from grpc_health.v1 import health_pb2

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _grpc_health(fresh_teacher.address) == serving
    assert httpx.get(f"{fresh_teacher.ops_url}/readyz").status_code == 200
    fresh_teacher.call(fresh_teacher.server._set_health(not_serving))
    assert _grpc_health(fresh_teacher.address) == not_serving
    ready = httpx.get(f"{fresh_teacher.ops_url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert httpx.get(f"{fresh_teacher.ops_url}/healthz").status_code == 200  # alive, only not ready
    fresh_teacher.call(fresh_teacher.server._set_health(serving))
    assert httpx.get(f"{fresh_teacher.ops_url}/readyz").status_code == 200


def test_json_score_equals_grpc_score(hf_teacher):
    ids = [3, 17, 250, 42, 9, 100, 7, 8]
    with TeacherClientSync(hf_teacher.address) as client:
        grpc_scores = client.score(ids, 3, top_k=5)
    body = httpx.post(
        f"{hf_teacher.ops_url}/v1/score", json={"token_ids": ids, "score_from": 3, "top_k": 5}, timeout=30
    ).json()
    assert body["num_positions"] == 5 and body["score_from"] == 3
    np.testing.assert_array_equal(np.array(body["token_logprobs"], np.float32), grpc_scores.token_logprobs)
    np.testing.assert_array_equal(np.array(body["topk_ids"]), grpc_scores.topk_ids)
    np.testing.assert_array_equal(np.array(body["topk_logprobs"], np.float32), grpc_scores.topk_logprobs)
    np.testing.assert_array_equal(np.array(body["tail_logprobs"], np.float32), grpc_scores.tail_logprobs)


def test_json_score_reports_bad_input_as_400_with_the_field(hf_teacher):
    r = httpx.post(f"{hf_teacher.ops_url}/v1/score", json={"token_ids": [1, 2, 3], "score_from": 3}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "INVALID_ARGUMENT" and "score_from=3" in r.json()["error"]["message"]
    r = httpx.post(f"{hf_teacher.ops_url}/v1/score", json={"token_ids": "nope", "score_from": 1}, timeout=30)
    assert r.status_code == 422  # schema errors from FastAPI name the field too
    assert "token_ids" in r.text
