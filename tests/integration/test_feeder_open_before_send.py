"""The prompt feeder opens a prompt before it is in Redis, so its rollouts are accepted however fast they come.

A worker can read a prompt, sample it and push its rollouts before the feeder's coroutine resumes from the XADD
(both run on the trainer's I/O loop, which a step keeps busy); the rollout source refuses and acknowledges a
rollout of one of this run's prompts that is not open. Before the fix the prompt was opened after the XADD
returned, and such a group was acknowledged without being trained (found by the trainer kill -9 fault test).
Real Redis; the worker's push happens inside the XADD's await, which is where the race window is.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from opd.streams import PAYLOAD, RedisConfig
from protos.records import PromptRecord, RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.groups.feeder import PromptFeeder
from student_trainer.groups.source import RolloutSource

pytestmark = pytest.mark.timeout(60)


def _rollout(prompt_id: str, entry: str, sample: int) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=f"{prompt_id}@{entry}/{sample}",
        prompt_id=prompt_id,
        group_id=f"{prompt_id}@{entry}",
        group_size=2,
        split="train",
        prompt_ids=np.array([1, 2], np.int32),
        response_ids=np.array([3, 4], np.int32),
        response_mask=np.ones(2, np.uint8),
        behaviour_logprobs=np.zeros(2, np.float32),
        reward=1.0,
    )


def test_rollouts_pushed_before_the_feeders_xadd_returns_make_a_group(redis_url, namespace, tmp_path):
    config = TrainerConfig(
        model=str(tmp_path),
        redis=RedisConfig(url=redis_url, namespace=namespace),
        checkpoint={"dir": str(tmp_path / "ckpt")},
    )
    prompts = [
        PromptRecord(prompt_id=f"q{i}", group_size=2, messages=[{"role": "user", "content": "hi"}]) for i in range(2)
    ]

    async def run() -> None:
        source = RolloutSource(config)
        feeder = PromptFeeder(source, config, prompts)
        source.admit_with(feeder)
        send_many = source.prompts.send_many
        pushed = RolloutSource(config)  # another connection, as a worker's

        async def send_then_a_worker_answers(payloads):
            entry_ids = await send_many(payloads)
            # the worker's rollouts land, and the trainer polls them, before the feeder's coroutine resumes
            for pid, entry in zip(("q0", "q1"), entry_ids, strict=False):
                for sample in (0, 1):
                    await pushed.redis.xadd(source.keys.rollouts, {PAYLOAD: _rollout(pid, entry, sample).encode()})
            await source.poll()
            return entry_ids

        source.prompts.send_many = send_then_a_worker_answers
        assert await feeder._feed_next()
        groups = await asyncio.wait_for(source.next_groups(2), 10)
        assert sorted(g[0].prompt_id for g in groups) == ["q0", "q1"]
        assert all(len(g) == 2 for g in groups)
        assert source.stats.duplicates_skipped == 0  # nothing refused and acknowledged
        assert {p: o.entry_id is not None for p, o in feeder.ledger.open.items()} == {"q0": True, "q1": True}
        await pushed.close()
        await source.close()

    asyncio.run(run())
