"""A teacher replica added while clients run gets traffic: streams and connections end at a maximum age, and
clients reopen them on any replica their target resolves to."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from teacher_server.client import TeacherClient
from tests.fixtures.teacher import random_sequences, start_teacher

pytestmark = pytest.mark.timeout(240)

AGE = {"max_connection_age_s": 1.0, "max_connection_age_grace_s": 5.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _codes(server) -> dict[str, float]:
    """Requests answered by `server`, by status code."""
    out: dict[str, float] = {}
    for metric in server.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "opd_teacher_requests_total":
                out[sample.labels["code"]] = out.get(sample.labels["code"], 0) + sample.value
    return out


def _scored(server) -> float:
    return sum(_codes(server).values())


async def _score_until_the_late_server_answers(target: str, late_port: int, model_dir, deadline_s: float):
    """Score in rounds on one client; start a second server after the first round; stop once it answered.
    Returns (the late server or None, the scores of every round)."""
    sequences = random_sequences(8, 384, seed=4)
    late, results = None, []
    async with TeacherClient(target, timeout_s=60) as client:
        results += await asyncio.gather(*(client.score(ids, 1, top_k=2) for ids in sequences))
        late = await asyncio.to_thread(start_teacher, model_dir, "hf", grpc={"port": late_port, **AGE})
        deadline = time.monotonic() + deadline_s
        while _scored(late) == 0 and time.monotonic() < deadline:
            results += await asyncio.gather(*(client.score(ids, 1, top_k=2) for ids in sequences))
            await asyncio.sleep(0.1)
    return late, sequences, results


def test_a_replica_started_late_gets_traffic_from_a_running_client(tiny_model_dir):
    first = start_teacher(tiny_model_dir, "hf", grpc=AGE)
    late_port = _free_port()
    target = f"ipv4:127.0.0.1:{first.server.grpc_port},127.0.0.1:{late_port}"
    late = None
    try:
        late, sequences, results = asyncio.run(
            _score_until_the_late_server_answers(target, late_port, tiny_model_dir, deadline_s=60)
        )
        assert _scored(late) > 0, "the replica started late got no request within 60 s"
        # every request answered, with the right shape, and no server answered anything but OK: the
        # streams that ended at their age answered what they had accepted
        assert len(results) % len(sequences) == 0
        for i, scores in enumerate(results):
            assert scores.token_logprobs.shape == (len(sequences[i % len(sequences)]) - 1,)
        assert set(_codes(first)) == {"OK"} and set(_codes(late)) == {"OK"}
    finally:
        first.stop()
        if late is not None:
            late.stop()
