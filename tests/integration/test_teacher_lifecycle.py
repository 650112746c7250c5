"""Auth, gRPC health and reflection, surviving a server restart mid-stream, draining on shutdown."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from teacher_server.client import TeacherClient, TeacherClientSync, Unauthenticated
from tests.fixtures.teacher import random_sequences, reference_logprobs, start_teacher

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def authed_teacher(tiny_model_dir, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice: secret-a\nbob: secret-b\n")
    monkeypatch.setenv("OPD_TEST_TOKENS", "carol:secret-c")
    server = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": str(tokens), "tokens_env": "OPD_TEST_TOKENS"})
    yield server
    server.stop()


def test_auth_accepts_known_tokens_and_rejects_others(authed_teacher):
    for token in ("secret-a", "secret-c"):
        with TeacherClientSync(authed_teacher.address, token=token) as client:
            assert client.score([1, 2, 3], 1).token_logprobs.shape == (2,)
            assert client.info().vocab_size == 384
    for token in (None, "wrong"):
        with TeacherClientSync(authed_teacher.address, token=token) as client:
            with pytest.raises(Unauthenticated):
                client.score([1, 2, 3], 1, timeout_s=10)
            with pytest.raises(Unauthenticated):
                client.info(timeout_s=10)
    ok = httpx.post(
        f"{authed_teacher.ops_url}/v1/score",
        json={"token_ids": [1, 2, 3], "score_from": 1},
        headers={"Authorization": "Bearer secret-b"},
        timeout=30,
    )
    denied = httpx.post(
        f"{authed_teacher.ops_url}/v1/score", json={"token_ids": [1, 2, 3], "score_from": 1}, timeout=30
    )
    assert ok.status_code == 200 and denied.status_code == 401
    metrics = httpx.get(f"{authed_teacher.ops_url}/metrics").text
    assert 'opd_teacher_scored_tokens_total{client="alice"} 2.0' in metrics
    assert 'opd_teacher_scored_tokens_total{client="bob"} 2.0' in metrics


def test_health_reports_serving_and_reflection_lists_the_service(hf_teacher):
    with grpc.insecure_channel(hf_teacher.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "opd.teacher.v1.Teacher"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"opd.teacher.v1.Teacher", "grpc.health.v1.Health"} <= names


def test_client_survives_a_server_restart_mid_stream_without_losing_a_request(tiny_model_dir):
    first = start_teacher(tiny_model_dir, "hf")
    port = first.server.grpc_port
    sequences = random_sequences(30, 384, min_len=64, max_len=128, seed=21)
    holder = {}

    async def main():
        async with TeacherClient(f"127.0.0.1:{port}", timeout_s=90) as client:
            tasks = [asyncio.create_task(client.score(ids, 1, top_k=3)) for ids in sequences]
            while sum(t.done() for t in tasks) < 3:  # some answered on the first server's stream
                await asyncio.sleep(0.01)
            await asyncio.to_thread(first.stop, 0.0)  # abrupt: in-flight and queued requests are cut
            await asyncio.sleep(0.5)
            holder["second"] = await asyncio.to_thread(start_teacher, tiny_model_dir, "hf", grpc={"port": port})
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
    finally:
        if "second" in holder:
            holder["second"].stop()
    assert len(results) == len(sequences)
    for ids, scores in zip(sequences, results, strict=True):
        ref = reference_logprobs(tiny_model_dir, ids)
        np.testing.assert_allclose(scores.token_logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)


def test_stop_drains_in_flight_work_and_reports_not_serving(tiny_model_dir):
    server = start_teacher(tiny_model_dir, "hf")
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)

    async def main():
        async with TeacherClient(server.address) as client:
            tasks = [asyncio.create_task(client.score(np.arange(1, 200), 1)) for _ in range(6)]
            while server.server.scheduler.accepted_requests < 6:  # all six reached the server
                await asyncio.sleep(0.005)
            stopper = asyncio.create_task(asyncio.to_thread(server.stop, 30.0))
            results = await asyncio.gather(*tasks)
            await stopper
            return results

    results = asyncio.run(main())
    assert all(r.token_logprobs.shape == (198,) for r in results)  # accepted work finished during the drain
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    channel.close()
