"""Outages are not silent: every retry loop of the teacher client and the workers logs at WARNING (address,
attempt, next delay) at a bounded rate and counts the retry in metrics."""

from __future__ import annotations

import asyncio
import logging

import pytest

from opd.redis_server import free_port
from opd.streams import RedisConfig, RedisRetry, StreamError, StreamKeys, connect, redis_address
from teacher_server.client import DeadlineExceeded, TeacherClient, Unavailable
from tests.fixtures.rollout import rollout_config

pytestmark = pytest.mark.timeout(60)


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_teacher_client_retries_are_logged_with_the_target_and_counted(caplog):
    caplog.set_level(logging.WARNING, logger="teacher_server.client")
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with TeacherClient(target, timeout_s=3) as client:
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.score([1, 2, 3], 1)
    retries = client.retry_stats.counts[(target, "UNAVAILABLE")]
    assert retries >= 3  # backoff from 0.05 s doubling: several tries fit in 3 s
    lines = [line for line in _warnings(caplog, "teacher_server.client") if "retrying in" in line]
    # one line per target per 10 s: the 3 s outage is one line however many retries it took
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"teacher call at {target} failed (UNAVAILABLE") and "attempt 1," in lines[0]


async def test_redis_retries_name_the_server_without_its_password_and_are_counted(caplog):
    caplog.set_level(logging.WARNING, logger="opd.streams")
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    redis = connect(RedisConfig(url=url))
    retry = RedisRetry(retry_for_s=2.0, address=redis_address(url))

    async def ping() -> bool:
        return await redis.ping()

    with pytest.raises(StreamError, match="unreachable"):
        await retry.run(ping, "PING")
    await redis.aclose()
    lines = _warnings(caplog, "opd.streams")
    assert retry.stats.retries >= 3
    assert len(lines) == 1, lines  # rate-bounded: one line per 10 s
    assert lines[0].startswith(f"redis at redis://127.0.0.1:{url.rsplit(':', 1)[1]} failed (PING: ConnectionError")
    assert "attempt 1, retrying in" in lines[0] and "hunter2" not in lines[0]


async def test_policy_watcher_resubscribe_loop_is_logged_and_counted(tiny_model_dir, namespace, caplog):
    from rollout_workers.engine import create_backend
    from rollout_workers.metrics import RolloutMetrics
    from rollout_workers.reload import PolicyWatcher

    caplog.set_level(logging.WARNING, logger="opd.streams")
    url = f"redis://127.0.0.1:{free_port()}/0"  # Redis is down for the whole test
    backend = await create_backend(rollout_config(tiny_model_dir, url, namespace))
    metrics = RolloutMetrics()
    retry = RedisRetry(retry_for_s=30, stats=metrics.stats, address=redis_address(url))
    redis = connect(RedisConfig(url=url))
    stop = asyncio.Event()
    watcher = PolicyWatcher(redis, StreamKeys(namespace), backend, metrics=metrics, retry=retry, poll_s=0.2)
    task = asyncio.create_task(watcher.run(stop))
    deadline = asyncio.get_running_loop().time() + 30
    while metrics.stats.retries < 2:  # counted where /metrics exports it: opd_rollout_redis_retries_total
        assert asyncio.get_running_loop().time() < deadline, "the watcher's resubscribe loop counted no retry"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    await redis.aclose()
    await backend.close()
    assert metrics.registry.get_sample_value("opd_rollout_redis_retries_total") >= 2
    lines = _warnings(caplog, "opd.streams")
    assert lines and lines[0].startswith(f"redis at {url} failed (policy watch {namespace}:policy:events")
