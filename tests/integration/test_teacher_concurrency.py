"""Many clients at once: correct independent results, fair share under a flood, a bounded queue."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack
from teacher_server.client import TeacherClient
from tests.fixtures.teacher import random_sequences, reference_logprobs, start_teacher

pytestmark = pytest.mark.timeout(300)


def test_concurrent_clients_get_their_own_correct_results(any_teacher, tiny_model_dir):
    sequences = random_sequences(24, 384, seed=11)

    async def one_client(name: str, mine: list[np.ndarray]):
        async with TeacherClient(any_teacher.address, client_name=name) as client:
            return await client.score_many([(ids, 1) for ids in mine], top_k=4)

    async def main():
        return await asyncio.gather(*(one_client(f"c{i}", sequences[i::4]) for i in range(4)))

    results = asyncio.run(main())
    for i, per_client in enumerate(results):
        for ids, scores in zip(sequences[i::4], per_client, strict=True):
            ref = reference_logprobs(tiny_model_dir, ids)
            np.testing.assert_allclose(scores.token_logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)


def test_fair_share_serves_a_light_client_promptly_while_another_floods(tiny_model_dir):
    # One request per batch and one batch at a time, so the completion order is the scheduler's order.
    server = start_teacher(tiny_model_dir, "hf", scheduler={"max_batch_requests": 1, "batch_wait_ms": 0})
    order: list[str] = []

    async def main():
        async with (
            TeacherClient(server.address, client_name="greedy") as greedy,
            TeacherClient(server.address, client_name="polite") as polite,
        ):

            async def tagged(client, tag, ids):
                await client.score(ids, 1)
                order.append(tag)

            flood = [
                asyncio.create_task(tagged(greedy, "greedy", ids))
                for ids in random_sequences(40, 384, min_len=200, max_len=200, seed=1)
            ]
            while len(order) < 2:  # the flood is queued and being served
                await asyncio.sleep(0.005)
            light = [
                asyncio.create_task(tagged(polite, "polite", ids))
                for ids in random_sequences(3, 384, min_len=200, max_len=200, seed=2)
            ]
            await asyncio.gather(*flood, *light)

    try:
        asyncio.run(main())
    finally:
        server.stop()
    last_polite = max(i for i, tag in enumerate(order) if tag == "polite")
    # FIFO would finish the polite client after the whole flood (index >= 40); fair share interleaves it.
    assert last_polite < 16, order


def test_full_queue_answers_resource_exhausted_with_a_retry_hint_and_the_client_retries(tiny_model_dir):
    server = start_teacher(
        tiny_model_dir, "hf", scheduler={"max_queued_requests": 2, "max_batch_requests": 1, "batch_wait_ms": 0}
    )
    request = pb.ScoreRequest(token_ids=pack(np.arange(1, 300), pb.INT32), score_from=1, top_k=4)

    async def raw_flood():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TeacherStub(channel)
            calls = [stub.Score(request, timeout=60) for _ in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)

    async def client_flood():
        async with TeacherClient(server.address) as client:
            return await client.score_many([(np.arange(1, 300), 1)] * 12, top_k=4)

    try:
        outcomes = asyncio.run(raw_flood())
        rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert rejected and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in rejected)
        hints = [float(v) for e in rejected for k, v in e.trailing_metadata() if k == "retry-after-s"]
        assert len(hints) == len(rejected) and all(h > 0 for h in hints)
        assert "retry in" in rejected[0].details()
        assert len(asyncio.run(client_flood())) == 12  # the client backs off and gets every answer
    finally:
        server.stop()


def test_client_balances_round_robin_across_several_servers(tiny_model_dir):
    import httpx

    servers = [start_teacher(tiny_model_dir, "hf") for _ in range(2)]

    async def main():
        async with TeacherClient([s.address for s in servers], client_name="rr") as client:
            return await client.score_many([(np.arange(1, 11), 1)] * 8)

    try:
        assert len(asyncio.run(main())) == 8
        scored = [httpx.get(f"{s.ops_url}/metrics").text for s in servers]
    finally:
        for s in servers:
            s.stop()
    for text in scored:
        assert 'opd_teacher_scored_tokens_total{client="rr"} 36.0' in text  # 4 requests x 9 positions each
