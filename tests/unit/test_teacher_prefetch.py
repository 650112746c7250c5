"""The prefetch requests teacher scores in order, `depth` batches ahead, within a byte cap (pure logic: a fake
score source that records what was asked)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from protos.records import RolloutRecord
from student_trainer.batches import Batch, TeacherPrefetch

pytestmark = pytest.mark.timeout(30)


class FakeSource:
    """Replies of `per_token` bytes per scored token; remembers which rollouts were requested."""

    def __init__(self, per_token: int) -> None:
        self.per_token, self.requested = per_token, []

    def bytes_per_token(self) -> int:
        return self.per_token

    def fetch(self, records) -> Future:
        self.requested.append(records[0].rollout_id)
        future: Future = Future()
        future.set_result({})
        return future


def batch(name: str, tokens: int) -> Batch:
    record = RolloutRecord(
        rollout_id=name,
        prompt_id=name,
        group_id=name,
        group_size=1,
        split="train",
        prompt_ids=np.zeros(2, np.int32),
        response_ids=np.zeros(tokens, np.int32),
        response_mask=np.ones(tokens, np.uint8),
        behaviour_logprobs=np.zeros(tokens, np.float32),
    )
    return Batch([[record]], [[record]], {})


def puller(*batches: Batch):
    queue = list(batches)
    return lambda: queue.pop(0)


def test_without_a_cap_every_queued_batch_is_requested_depth_ahead():
    source = FakeSource(per_token=1000)
    prefetch = TeacherPrefetch(source, depth=2)
    pull = puller(*(batch(f"b{i}", 10) for i in range(5)))
    assert prefetch.next(pull).mine[0][0].rollout_id == "b0"
    assert source.requested == ["b0", "b1", "b2"]


def test_a_batch_over_the_byte_cap_waits_until_the_ones_before_it_train():
    source = FakeSource(per_token=1000)  # 10 tokens = 10 kB per batch
    prefetch = TeacherPrefetch(source, depth=2, max_bytes=15_000)  # room for one queued batch
    pull = puller(*(batch(f"b{i}", 10) for i in range(5)))
    head = prefetch.next(pull)
    assert head.mine[0][0].rollout_id == "b0" and source.requested == ["b0", "b1"]  # b2 held back
    assert prefetch.held_bytes() == 10_000
    prefetch.next(pull)  # b1 trains: b2 fits now, b3 does not
    assert source.requested == ["b0", "b1", "b2"]


def test_the_batch_about_to_train_is_requested_however_large():
    source = FakeSource(per_token=1000)
    prefetch = TeacherPrefetch(source, depth=1, max_bytes=1_000)
    head = prefetch.next(puller(batch("huge", 50), batch("next", 5)))
    assert head.requested and source.requested == ["huge"]  # "next" (5 kB) is over the 1 kB cap: it waits


def test_no_batch_is_pulled_beyond_the_runs_last_step():
    source = FakeSource(per_token=1000)
    prefetch = TeacherPrefetch(source, depth=2)
    pulled: list[str] = []
    queue = [batch(f"b{i}", 10) for i in range(5)]

    def pull() -> Batch:
        pulled.append(queue[0].mine[0][0].rollout_id)
        return queue.pop(0)

    assert prefetch.next(pull, remaining=2).mine[0][0].rollout_id == "b0"  # two steps left: b0 and b1 only
    assert pulled == ["b0", "b1"]
    assert prefetch.next(pull, remaining=1).mine[0][0].rollout_id == "b1"  # the last step: nothing more
    assert pulled == ["b0", "b1"]
