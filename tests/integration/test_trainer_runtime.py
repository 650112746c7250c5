"""The trainer runtime in-process on a tiny model: real Redis, a real teacher over gRPC, its ops port scraped.

Rollouts are pushed straight onto `{ns}:rollouts` (no worker), so the test controls what the trainer reads:
its transport counters reach `/metrics`, a used rollout stays pending until the checkpoint that used it is
committed, and a resumed trainer skips the rollouts its checkpoint lists as used.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opd.loop_thread import LoopThread
from opd.streams import ROLLOUT_GROUP, RedisConfig, StreamKeys, StreamProducer, connect
from student_trainer.config import TrainerConfig
from student_trainer.model import init_distributed
from student_trainer.runtime import TrainerRuntime
from tests.fixtures.rollout import make_rollout

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def io():
    loop = LoopThread("test-trainer-io")
    yield loop
    loop.stop()


def _config(model: Path, teacher: str, redis_url: str, namespace: str, run: Path, **overrides) -> TrainerConfig:
    base = {
        "model": str(model),
        "teacher": {"addresses": [teacher]},
        "redis": {"url": redis_url, "namespace": namespace},
        "loss": {"divergence": "fkl"},
        "batch": {"groups_per_step": 1, "prefetch_depth": 0, "read_block_ms": 100},
        "checkpoint": {"dir": str(run / "ck"), "every_steps": 2},
        "publish": {"uri": str(run / "weights")},
        "ops": {"host": "127.0.0.1", "port": 0},
        "max_steps": 3,
    }
    return TrainerConfig.model_validate({**base, **overrides})


def _push(io: LoopThread, redis_url: str, namespace: str, payloads: list[bytes]) -> None:
    async def push() -> None:
        redis = connect(RedisConfig(url=redis_url))
        await StreamProducer(redis, StreamKeys(namespace).rollouts, ROLLOUT_GROUP).send_many(payloads)
        await redis.aclose()

    io.call(push())


def _pending(io: LoopThread, redis_url: str, namespace: str) -> int:
    async def count() -> int:
        redis = connect(RedisConfig(url=redis_url))
        try:
            return int((await redis.xpending(StreamKeys(namespace).rollouts, ROLLOUT_GROUP))["pending"])
        finally:
            await redis.aclose()

    return io.call(count())


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _rollout(i: int) -> bytes:
    return make_rollout(i, prompt_id=f"g{i}").encode()  # one group of one rollout per prompt


def test_transport_counters_on_metrics_and_acks_only_after_the_commit(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io
):
    _push(io, redis_url, namespace, [_rollout(0), b"\x93not-a-record", _rollout(0), _rollout(1)])
    config = _config(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path)
    runtime = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        runtime.start()
        runtime.trainer.step()
        runtime.after_step()
        assert _pending(io, redis_url, namespace) == 2  # g0/0 trained but not committed, g1/1 read: both pending
        runtime.trainer.step()  # step 2: checkpoint committed, then both rollouts acknowledged
        runtime.after_step()
        assert _pending(io, redis_url, namespace) == 0
        samples = _scrape(runtime.ops_port)
    finally:
        runtime.close()
    assert samples[("opd_trainer_dead_lettered_records_total", ())] == 1
    assert samples[("opd_trainer_duplicate_records_total", ())] == 1
    assert samples[("opd_trainer_rollouts_total", (("outcome", "trained"),))] == 2
    assert ("opd_trainer_redis_retries_total", ()) in samples and ("opd_trainer_reclaimed_records_total", ()) in samples
    assert samples[("opd_trainer_step", ())] == 2


def test_a_resumed_trainer_skips_the_rollouts_its_checkpoint_used(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io
):
    _push(io, redis_url, namespace, [_rollout(0), _rollout(1)])
    config = _config(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path)
    first = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        first.start()
        first.trainer.step()
        first.trainer.step()  # committed at step 2 with g0/0 and g1/1 as used
    finally:
        first.close()
    _push(io, redis_url, namespace, [_rollout(1), _rollout(2)])  # g1/1 delivered again (a producer retry)
    resumed = TrainerRuntime(
        config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={"resume": True})}),
        init_distributed(config.dist),
        io,
    )
    try:
        resumed.start()
        assert resumed.trainer.step_no == 2
        resumed.trainer.step()
        samples = _scrape(resumed.ops_port)
    finally:
        resumed.close()
    assert samples[("opd_trainer_duplicate_records_total", ())] == 1
    steps = [json.loads(line) for line in (tmp_path / "ck" / "steps.jsonl").read_text().splitlines()]
    assert [s["rollouts"] for s in steps] == [["g0/0"], ["g1/1"], ["g2/2"]]  # g1/1 not trained twice
