"""The fair scheduler's ordering, bounds, deadlines and cancellation, against a scripted engine (pure logic)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from opd.auth import TeamPolicy
from teacher_server.config import SchedulerConfig
from teacher_server.engine import ScoreResult, ScoreWork, TeacherEngine
from teacher_server.errors import DeadlineExpired, Draining, InvalidRequest, QueueFull
from teacher_server.info import TeacherInfo
from teacher_server.metrics import TeacherMetrics
from teacher_server.scheduler import FairScheduler
from teacher_server.throughput import fair_level

pytestmark = pytest.mark.timeout(30)


class RecordingEngine(TeacherEngine):
    """Answers instantly (after an optional gate) and records which work ran in which batch."""

    info = TeacherInfo(
        model_name="fake",
        backend="fake",
        vocab_size=100,
        tokenizer_fingerprint="f",
        max_model_len=1000,
        max_top_k=8,
        supports_full_vocab=False,
        supports_temperature=False,
        dtype="float32",
    )

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def score_batch(self, works):
        await self.gate.wait()
        self.batches.append([int(w.token_ids[0]) for w in works])
        return [
            ScoreResult(
                np.zeros(w.num_positions, np.float32),
                np.zeros((w.num_positions, 0), np.int32),
                np.zeros((w.num_positions, 0), np.float32),
                np.zeros(w.num_positions, np.float32),
            )
            for w in works
        ]

    async def generate(self, work):
        raise NotImplementedError


def work(tag: int, length: int = 10) -> ScoreWork:
    ids = np.full(length, tag, dtype=np.int32)
    return ScoreWork(ids, 1, 0)


def make(engine, policy_of=None, **cfg) -> FairScheduler:
    """A started scheduler; the express lane is off unless asked for (most tests look at the fair queue)."""
    config = SchedulerConfig(**{"batch_wait_ms": 0, "express_lane": False, **cfg})
    scheduler = FairScheduler(engine, config, TeacherMetrics(), inflight_batches=1, policy_of=policy_of)
    scheduler.start()
    return scheduler


def test_clients_alternate_by_tokens_served():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        s = make(engine, max_batch_requests=1)
        futures = [s.submit("a", work(1), None) for _ in range(6)]
        futures += [s.submit("b", work(2), None) for _ in range(3)]
        engine.gate.set()
        await asyncio.gather(*futures)
        return [b[0] for b in engine.batches]

    order = asyncio.run(main())
    # the first batch started before b arrived; after that a and b share turns until b is done
    assert order[:7] == [1, 1, 2, 1, 2, 1, 2] or order[:7] == [1, 2, 1, 2, 1, 2, 1], order


def test_fair_share_counts_tokens_not_requests():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        s = make(engine, max_batch_requests=1)
        futures = [s.submit("long", work(1, 100), None) for _ in range(3)]
        futures += [s.submit("short", work(2, 10), None) for _ in range(12)]
        engine.gate.set()
        await asyncio.gather(*futures)
        return [b[0] for b in engine.batches]

    order = asyncio.run(main())
    # one 100-token request is worth ten 10-token requests
    second_long = [i for i, t in enumerate(order) if t == 1][1]
    assert order[:second_long].count(2) >= 9, order


def test_batches_respect_token_and_request_budgets():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        s = make(engine, max_batch_tokens=35, max_batch_requests=8)
        futures = [s.submit("a", work(i), None) for i in range(10)]
        engine.gate.set()
        await asyncio.gather(*futures)
        return engine.batches

    batches = asyncio.run(main())
    assert sum(len(b) for b in batches) == 10
    assert all(len(b) <= 3 for b in batches)  # 3 x 10 tokens fit in 35


def test_queue_bound_raises_queue_full_with_retry_hint():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        s = make(engine, max_queued_requests=3)
        for _ in range(3):
            s.submit("a", work(1), None)
        with pytest.raises(QueueFull) as err:
            s.submit("a", work(1), None)
        assert err.value.retry_after_s > 0
        s2 = make(RecordingEngine(), max_queued_tokens=15)
        s2.submit("a", work(1), None)
        with pytest.raises(QueueFull):
            s2.submit("a", work(1), None)

    asyncio.run(main())


def test_expired_and_cancelled_work_is_dropped_before_the_engine():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        s = make(engine, max_batch_requests=1)
        first = s.submit("a", work(1), None)  # occupies the engine
        await asyncio.sleep(0.01)
        expired = s.submit("a", work(2), timeout_s=0.01)
        cancelled = s.submit("a", work(3), None)
        kept = s.submit("a", work(4), None)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        engine.gate.set()
        await asyncio.gather(first, kept)
        with pytest.raises(DeadlineExpired):
            await expired
        return [b[0] for b in engine.batches]

    assert asyncio.run(main()) == [1, 4]


def test_drain_refuses_new_work_and_finishes_queued_work():
    async def main():
        engine = RecordingEngine()
        s = make(engine)
        queued = [s.submit("a", work(i), None) for i in range(4)]
        await s.drain(grace_s=5)
        with pytest.raises(Draining):
            s.submit("a", work(9), None)
        return [f.done() and f.exception() is None for f in queued]

    assert asyncio.run(main()) == [True] * 4


def test_weights_share_the_tokens_two_to_one():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        weights = {"heavy": TeamPolicy(weight=2.0), "light": TeamPolicy(weight=1.0)}
        s = make(engine, policy_of=weights.__getitem__, max_batch_requests=1)
        futures = [s.submit("heavy", work(1), None) for _ in range(20)]
        futures += [s.submit("light", work(2), None) for _ in range(20)]
        engine.gate.set()
        await asyncio.gather(*futures)
        return [b[0] for b in engine.batches]

    order = asyncio.run(main())
    # while both are backlogged (the first 30 batches: heavy's 20 run out by then), heavy gets two turns per turn
    # of light, within one quantum (one request of each) at every prefix
    for n in range(3, 30):
        heavy = order[:n].count(1)
        assert abs(heavy - 2 * n / 3) <= 1 + 2 / 3, (n, order)


def test_a_team_over_its_cap_is_refused_with_a_hint_and_the_others_are_not():
    async def main():
        engine = RecordingEngine()
        engine.gate.clear()
        caps = {"capped": TeamPolicy(max_queued_requests=2), "tokens": TeamPolicy(max_queued_tokens=25)}
        s = make(engine, policy_of=lambda c: caps.get(c, TeamPolicy()))
        s.submit("capped", work(1), None)
        s.submit("capped", work(1), None)
        with pytest.raises(QueueFull, match=r"team 'capped' has 2 requests .* max_queued_requests 2") as err:
            s.submit("capped", work(1), None)
        assert err.value.retry_after_s > 0
        s.submit("tokens", work(3), None)
        s.submit("tokens", work(3), None)  # 20 of 25 tokens
        with pytest.raises(QueueFull, match="max_queued_tokens 25"):
            s.submit("tokens", work(3), None)
        with pytest.raises(InvalidRequest, match="can never fit"):
            s.submit("tokens", work(3, length=26), None)
        others = [s.submit("other", work(2), None) for _ in range(10)]  # no cap: all queued
        engine.gate.set()
        await asyncio.gather(*others)

    asyncio.run(main())


class GatedExpressEngine(RecordingEngine):
    """Bulk batches wait on `gate`; express batches run at once and are recorded apart."""

    def __init__(self) -> None:
        super().__init__()
        self.express: list[list[int]] = []

    async def score_batch_express(self, works):
        self.express.append([int(w.token_ids[0]) for w in works])
        gate, self.gate = self.gate, asyncio.Event()
        self.gate.set()
        try:
            return await self.score_batch(works)
        finally:
            self.gate = gate


@pytest.mark.parametrize("express_lane", [True, False])
def test_a_light_client_runs_in_the_express_lane_while_a_flooder_holds_the_engine(express_lane):
    async def main():
        engine = GatedExpressEngine()
        engine.gate.clear()  # the flooder's first batch occupies the engine until released
        s = make(engine, max_batch_requests=4, express_lane=express_lane)
        s._throughput._tokens, s._throughput._busy_s = 100.0, 1.0  # the engine does 100 tokens/s
        flood = [s.submit("flooder", work(1), None) for _ in range(40)]  # 400 tokens at once: over its share
        await asyncio.sleep(0)  # the bulk loop takes its first batch, which blocks on the gate
        # 10 tokens, nothing queued; the max-min fair level is 90 tokens/s, and 10 <= 90 / 2
        light = s.submit("light", work(2), None)
        if express_lane:
            result = await asyncio.wait_for(light, timeout=10)  # answered while the bulk batch still runs
            assert not engine.gate.is_set() and result.token_logprobs.shape == (9,)
        engine.gate.set()
        await asyncio.gather(*flood, light)
        return engine

    engine = asyncio.run(main())
    assert engine.express == ([[2]] if express_lane else [])
    assert sorted(t for b in engine.batches for t in b) == [1] * 40 + [2]


class SlowExpressEngine(GatedExpressEngine):
    """Like GatedExpressEngine, but express batches wait on `express_gate` (a light request still running)."""

    def __init__(self) -> None:
        super().__init__()
        self.express_gate = asyncio.Event()

    async def score_batch_express(self, works):
        await self.express_gate.wait()
        return await super().score_batch_express(works)


def test_a_light_clients_next_request_stays_express_while_its_previous_one_runs_but_a_burst_does_not():
    async def main():
        engine = SlowExpressEngine()
        engine.gate.clear()  # the flooder's batch holds the bulk lane
        s = make(engine, max_batch_requests=4, max_batch_tokens=40, express_lane=True)
        s._throughput._tokens, s._throughput._busy_s = 1000.0, 1.0  # the engine does 1000 tokens/s
        flood = [s.submit("flooder", work(1), None) for _ in range(400)]  # 4000 tokens at once: over its share
        await asyncio.sleep(0)
        # light: 10-token requests; its share of one batch is 40 tokens x 1/2 = 20
        light = [s.submit("light", work(2), None)]
        for _ in range(3):
            await asyncio.sleep(0)  # the express loop takes it; it runs (waits on express_gate)
        assert s._express_held["light"] == 0
        light += [s.submit("light", work(2), None) for _ in range(2)]  # wait in the express lane: 20 tokens
        assert s._express_held["light"] == 20 and s._held_tokens["light"] == 20
        burst = s.submit("light", work(3), None)  # would pass its share of a batch: the fair queue
        assert s._express_held["light"] == 20 and s._held_tokens["light"] == 30
        engine.express_gate.set()
        engine.gate.set()
        await asyncio.gather(*flood, *light, burst)
        return engine

    engine = asyncio.run(main())
    assert engine.express == [[2], [2, 2]]
    assert 3 in [t for b in engine.batches for t in b]  # the burst ran in a bulk batch


def test_the_throughput_estimate_stays_near_the_true_rate_when_express_batches_finish_inside_bulk_ones():
    # Cycles of one bulk batch (8192 tokens, 2.5 s) with 19 express batches (128 tokens) finishing inside it,
    # one every 0.125 s: the engine delivers 10624 tokens per 2.5 s = 4249.6 tokens/s. Each express batch is
    # credited the busy time since the last finish, the bulk batch's tokens come in one lump at its end.
    # With sums decayed over tau = 10 s, a lump moves the estimate by at most about 8192 / (tau x 4249.6)
    # = 19% above, and the 19 express finishes take it down by the same amount before the next lump.
    from teacher_server.throughput import EngineThroughput

    est, now, true_rate, seen = EngineThroughput(), 0.0, 10624 / 2.5, []
    for cycle in range(40):
        est.started(now)
        for _ in range(19):
            est.started(now + 0.0625)
            now += 0.125
            est.finished(128, now)
            seen.append((cycle, est.tokens_per_s))
        now += 2.5 - 19 * 0.125
        est.finished(8192, now)
        seen.append((cycle, est.tokens_per_s))
    settled = [rate / true_rate for cycle, rate in seen if cycle >= 20]  # the prior has decayed away
    assert max(settled) < 1.25 and min(settled) > 0.75, (min(settled), max(settled))


def test_fair_level_is_the_max_min_share_per_unit_of_weight():
    assert fair_level({"a": 1, "b": 1, "c": 1, "d": 10}, dict.fromkeys("abcd", 1.0), 8) == 5
    assert fair_level({"a": 10, "b": 10}, {"a": 2.0, "b": 1.0}, 6) == 2
    assert fair_level({"a": 1, "b": 10}, {"a": 1.0, "b": 1.0}, 11) == math.inf  # everything fits


class SteppingEngine(RecordingEngine):
    """An engine that batches requests itself (like vllm): `step_tokens` set, each request held until `step()`
    answers the oldest ones; records the bulk tokens it holds and the order requests arrive."""

    step_tokens = 20
    concurrent_express = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[int, int, asyncio.Future[None]]] = []  # (tag, tokens, release)
        self.arrivals: list[int] = []
        self.most_held = 0
        self.express: list[int] = []

    async def score_batch(self, works):
        assert len(works) == 1  # handed over request by request
        release = asyncio.get_running_loop().create_future()
        self.held.append((int(works[0].token_ids[0]), works[0].num_tokens, release))
        self.arrivals.append(int(works[0].token_ids[0]))
        self.most_held = max(self.most_held, sum(t for _, t, _ in self.held))
        await release
        return await super().score_batch(works)

    async def score_batch_express(self, works):
        self.express.extend(int(w.token_ids[0]) for w in works)
        return await RecordingEngine.score_batch(self, works)

    async def step(self, tokens: int) -> None:
        """Answer the oldest held requests, up to `tokens` tokens (one step), and let the scheduler refill."""
        while self.held and tokens > 0:
            _, n, release = self.held.pop(0)
            tokens -= n
            release.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


def test_an_engine_that_batches_itself_holds_two_steps_of_bulk_work_and_the_fair_queue_orders_the_rest():
    async def main():
        engine = SteppingEngine()
        s = make(engine, max_batch_requests=64, max_batch_tokens=1000, bulk_engine_steps=2)
        flood = [s.submit("flooder", work(1), None) for _ in range(30)]  # 300 tokens, 10 each
        for _ in range(3):
            await asyncio.sleep(0)
        # 2 steps of 20 tokens: 4 requests of 10 tokens in the engine, the other 26 in opd's fair queue
        assert sum(t for _, t, _ in engine.held) == 40 and s._bulk_queued == 26
        other = [s.submit("other", work(2), None) for _ in range(4)]
        while engine.held:
            await engine.step(20)
        await asyncio.gather(*flood, *other)
        return engine

    engine = asyncio.run(main())
    assert engine.most_held == 40  # never more than two steps' worth handed over
    # once "other" arrived, the fair queue alternates the two clients for what enters the engine next:
    # its 4 requests are among the next 8 to enter, not behind the flooder's 26
    assert sorted(engine.arrivals[4:12]) == [1, 1, 1, 1, 2, 2, 2, 2], engine.arrivals


def test_express_requests_on_an_engine_that_batches_itself_do_not_wait_for_each_other():
    async def main():
        engine = SteppingEngine()
        s = make(engine, max_batch_requests=1, express_lane=True, bulk_engine_steps=2)
        s._throughput._tokens, s._throughput._busy_s = 100.0, 1.0  # the engine does 100 tokens/s
        flood = [s.submit("flooder", work(1), None) for _ in range(40)]  # over its share
        for _ in range(3):
            await asyncio.sleep(0)
        gate = engine.gate
        gate.clear()  # express requests now hang in the engine until the gate opens
        light = [s.submit("light", work(2), None), s.submit("light2", work(3), None)]
        for _ in range(5):
            await asyncio.sleep(0)
        started = list(engine.express)  # both handed over though the first is not answered
        gate.set()
        await asyncio.gather(*light)
        while engine.held:
            await engine.step(20)
        await asyncio.gather(*flood)
        return started

    assert sorted(asyncio.run(main())) == [2, 3]
