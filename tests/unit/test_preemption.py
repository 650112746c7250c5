"""The express gate: bulk threads park at checkpoints while express work runs, and only then (no timings)."""

from __future__ import annotations

import threading
import time

import pytest

from teacher_server.preemption import ExpressGate

pytestmark = pytest.mark.timeout(60)


def _poll(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"not reached: {what}"
        time.sleep(0.001)


def _bulk_thread(gate: ExpressGate, passed: threading.Event) -> threading.Thread:
    def run() -> None:
        gate.mark_bulk_thread()
        gate.checkpoint()
        passed.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_bulk_thread_parks_while_express_work_runs_and_goes_on_after_it():
    gate, passed = ExpressGate(), threading.Event()
    with gate.express():
        thread = _bulk_thread(gate, passed)
        _poll(lambda: gate.parked == 1, "the bulk thread parked")
        assert not passed.is_set()
        gate.checkpoint()  # the express thread's own checkpoints (the hooks fire on every thread) never park
    thread.join(timeout=30)
    assert passed.is_set() and gate.parked == 0
    assert gate.snapshot().yields == 1


def test_a_bulk_thread_waits_for_every_overlapping_express_batch():
    gate, passed = ExpressGate(), threading.Event()
    first, second = gate.express(), gate.express()
    first.__enter__()
    thread = _bulk_thread(gate, passed)
    _poll(lambda: gate.parked == 1, "the bulk thread parked")
    second.__enter__()
    first.__exit__(None, None, None)  # one express batch is still running: the bulk thread stays parked
    assert gate.parked == 1 and not passed.is_set()
    second.__exit__(None, None, None)
    thread.join(timeout=30)
    assert passed.is_set() and gate.snapshot().yields == 1


def test_without_express_work_a_checkpoint_returns_at_once_and_counts_nothing():
    gate, passed = ExpressGate(), threading.Event()
    _bulk_thread(gate, passed).join(timeout=30)
    assert passed.is_set()
    assert gate.snapshot().yields == 0 and gate.snapshot().seconds == 0.0


def test_an_express_batch_that_fails_still_releases_the_gate():
    gate, passed = ExpressGate(), threading.Event()
    with pytest.raises(RuntimeError), gate.express():
        raise RuntimeError("engine error")
    _bulk_thread(gate, passed).join(timeout=30)
    assert passed.is_set() and gate.snapshot().yields == 0


@pytest.mark.parametrize("express_lane", [True, False])
def test_the_hf_engine_has_preemption_points_only_with_the_express_lane(tiny_model_dir, express_lane):
    """With the lane off nothing can preempt a batch: no pre-hooks (today's behaviour, no cost); on, one before
    every decoder module and the lm-head. The log-probs are the same either way."""
    import asyncio

    import numpy as np

    from teacher_server.engine import ScoreWork
    from teacher_server.engine_hf import HFEngine
    from tests.fixtures.teacher import teacher_config

    engine = HFEngine(teacher_config(tiny_model_dir, "hf", scheduler={"express_lane": express_lane}))
    modules = [*engine._decoder.modules(), engine._lm_head]
    hooked = [m for m in modules if m._forward_pre_hooks]
    assert len(hooked) == (len(modules) if express_lane else 0)
    work = ScoreWork(np.arange(2, 34, dtype=np.int32), score_from=1, top_k=5)
    (result,) = asyncio.run(engine.score_batch([work]))
    plain = HFEngine(teacher_config(tiny_model_dir, "hf", scheduler={"express_lane": not express_lane}))
    (other,) = asyncio.run(plain.score_batch([work]))
    assert not isinstance(result, Exception) and not isinstance(other, Exception)
    np.testing.assert_array_equal(result.token_logprobs, other.token_logprobs)  # hooks return None: same math
    asyncio.run(engine.close())
    asyncio.run(plain.close())


def test_the_hf_engine_runs_a_bulk_batchs_linear_layers_in_preemptible_pieces(tiny_model_dir):
    """On CPU with the lane on, a bulk batch's linear layers on more than `hf_preempt_rows` positions run in
    pieces with a preemption point between them (more checkpoints than whole layers), same log-probs; express
    batches take the plain path."""
    import asyncio

    import numpy as np

    from teacher_server.engine import ScoreWork
    from teacher_server.engine_hf import HFEngine
    from tests.fixtures.teacher import teacher_config

    works = [ScoreWork(np.arange(2 + i, 34 + i, dtype=np.int32), score_from=1, top_k=5) for i in range(4)]
    checkpoints: dict[str, int] = {}
    results = {}
    for name, rows, express in (("pieces", 16, False), ("whole", 0, False), ("express", 16, True)):
        cfg = teacher_config(tiny_model_dir, "hf", engine={"hf_preempt_rows": rows, "device": "cpu"})
        engine = HFEngine(cfg)
        gate_checkpoint, count = engine._gate.checkpoint, [0]

        def counted(gate_checkpoint=gate_checkpoint, count=count) -> None:
            count[0] += 1
            gate_checkpoint()

        engine._gate.checkpoint = counted
        run = engine.score_batch_express if express else engine.score_batch
        results[name] = asyncio.run(run(works))
        checkpoints[name] = count[0]
        asyncio.run(engine.close())
    assert checkpoints["pieces"] > checkpoints["whole"] == checkpoints["express"] > 0, checkpoints
    for piece, whole in zip(results["pieces"], results["whole"], strict=True):
        assert not isinstance(piece, Exception) and not isinstance(whole, Exception)
        np.testing.assert_allclose(piece.token_logprobs, whole.token_logprobs, atol=1e-5)
        np.testing.assert_allclose(piece.topk_logprobs, whole.topk_logprobs, atol=1e-5)
