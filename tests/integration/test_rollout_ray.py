"""The rollout fleet as Ray actors on a local Ray: an actor killed mid-prompt is restarted by Ray and no
prompt is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from opd.streams import PROMPT_GROUP, RedisConfig, StreamKeys, connect
from protos.records import PromptRecord
from tests.fixtures.rollout import read_all_rollouts, rollout_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path.cwd())}},
    )
    yield ray
    ray.shutdown()


async def _feed(redis_url: str, namespace: str, records: list[PromptRecord]) -> None:
    from opd.prompts import feed_prompts
    from opd.streams import prompt_producer

    redis = connect(RedisConfig(url=redis_url))
    await feed_prompts(prompt_producer(redis, namespace), records)
    await redis.aclose()


async def _pending_of(redis_url: str, namespace: str, consumer: str) -> int:
    redis = connect(RedisConfig(url=redis_url))
    summary = await redis.xpending(StreamKeys(namespace).prompts, PROMPT_GROUP)
    await redis.aclose()
    return sum(int(c["pending"]) for c in summary["consumers"] or [] if c["name"].decode() == consumer)


def test_killed_actor_is_restarted_by_ray_and_no_prompt_is_lost(
    local_ray, tiny_model_dir: Path, redis_url: str, namespace: str
) -> None:
    from rollout_workers.fleet import RayFleet

    records = [PromptRecord(f"q{i}", group_size=2, messages=[{"role": "user", "content": f"q {i}"}]) for i in range(8)]
    asyncio.run(_feed(redis_url, namespace, records))
    config = rollout_config(
        tiny_model_dir,
        redis_url,
        namespace,
        workers=2,
        ray="local",
        ray_num_cpus=1,
        max_restarts=2,
        worker_id="ray",
        reward={"function": "tests.fixtures.rollout:slow_reward"},
        queue={"max_inflight_prompts": 1, "claim_idle_s": 30.0},
    )
    fleet = RayFleet(config).start()
    first_pid = None
    deadline = time.monotonic() + 90
    while first_pid is None:  # wait until actor 0 holds a prompt, then kill its process
        assert time.monotonic() < deadline, "actor 0 never took a prompt"
        status = fleet.statuses()[0]
        if status and asyncio.run(_pending_of(redis_url, namespace, "ray-0")):
            first_pid = status["pid"]
        time.sleep(0.05)
    os.kill(first_pid, signal.SIGKILL)
    result: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: result.setdefault("code", fleet.wait(poll_s=0.5)), daemon=True)
    waiter.start()
    waiter.join(150)
    statuses = fleet.statuses()
    fleet.stop()
    assert result.get("code") == 0
    assert statuses[0]["pid"] != first_pid  # Ray restarted actor 0 in a new process
    rollouts = asyncio.run(read_all_rollouts(redis_url, namespace))
    assert Counter(r.prompt_id for r in rollouts) == {f"q{i}": 2 for i in range(8)}  # nothing lost or doubled
    assert {r.meta["worker"] for r in rollouts} <= {"ray-0", "ray-1"}
