"""The trainer's reliability in-process on a tiny model: real Redis, a real teacher over gRPC, no worker process.

Rollouts are pushed straight onto `{ns}:rollouts`, or a scripted worker (`tests.fixtures.fake_worker`) answers the
prompts the trainer feeds, so each test controls exactly what the trainer sees: a sample delivered twice, prompts
a dead run left in Redis, a prompt that is dead-lettered or never answered, a starved trainer, a teacher that
went away, a batch that went stale while it waited in the prefetch queue, and an eval round whose first samples
came from the wrong policy version.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from pathlib import Path

import pytest

from opd.loop_thread import LoopThread
from student_trainer.model import init_distributed
from student_trainer.runtime import TrainerRuntime
from tests.fixtures import pipeline
from tests.fixtures.fake_worker import ScriptedWorker, rollout, rollouts_for
from tests.fixtures.teacher import start_teacher
from tests.fixtures.trainer_runtime import (
    Background,
    jsonl,
    pending_rollouts,
    push_rollouts,
    queued_prompt_ids,
    scrape,
    trainer_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def io():
    loop = LoopThread("test-trainer-io")
    yield loop
    loop.stop()


@pytest.fixture
def make_runtime(io):
    """Build (and close at the end) trainer runtimes on the test's I/O loop."""
    runtimes: list[TrainerRuntime] = []

    def make(config) -> TrainerRuntime:
        runtime = TrainerRuntime(config, init_distributed(config.dist), io)
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.stop.request()
        runtime.close()


def _resumed(config):
    return config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={"resume": True})})


def _start_worker(io: LoopThread, worker: ScriptedWorker):
    stop = asyncio.Event()
    task = io.submit(worker.run(stop))
    return lambda: (io.loop.call_soon_threadsafe(stop.set), task.result(30))


def _steps(config) -> list[dict]:
    return jsonl(Path(config.checkpoint.dir) / "steps.jsonl")


# -- exactly once by (prompt id, sample index) -------------------------------------------------------------------------


def test_a_sample_delivered_twice_is_trained_once_even_across_a_checkpoint(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    config = trainer_config(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path)
    push_rollouts(io, redis_url, namespace, [rollout("g0", "1-0"), rollout("g1", "2-0")])
    first = make_runtime(config)
    first.start()
    first.trainer.step()
    first.trainer.step()  # committed at step 2, with g0 sample 0 and g1 sample 0 as used
    first.close()
    # g0 fed again after the crash (another prompt entry, so another rollout id), g3 sampled twice in one run
    again = [rollout("g0", "3-0"), rollout("g2", "4-0"), rollout("g3", "5-0"), rollout("g3", "6-0")]
    push_rollouts(io, redis_url, namespace, [*again, rollout("g4", "7-0")])
    resumed = make_runtime(_resumed(config))
    resumed.start()
    for _ in range(3):
        resumed.trainer.step()
    trained = [s["rollouts"] for s in _steps(config)]
    assert trained == [["g0@1-0/0"], ["g1@2-0/0"], ["g2@4-0/0"], ["g3@5-0/0"], ["g4@7-0/0"]]
    assert scrape(resumed.ops_port)[("opd_trainer_duplicate_records_total", ())] == 2  # g0's and g3's copies


# -- a resumed feeder counts what is already in flight -----------------------------------------------------------------


def test_a_restarted_feeder_counts_the_prompts_already_in_redis_as_in_flight(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 6, "What is {i} + {i}?")
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data={"prompts": str(prompts), "max_inflight_groups": 2, "source": {"n_samples": 1}},
    )
    first = make_runtime(config)
    first.start()
    wait_until(lambda: len(queued_prompt_ids(io, redis_url, namespace)) == 2, 30, "the first two prompts fed")
    first.close()  # a trainer that dies with two prompts in flight (no worker took them)
    resumed = make_runtime(_resumed(config))
    resumed.start()
    push_rollouts(io, redis_url, namespace, [rollout("train0", "9-0")])  # train0's group arrives
    resumed.trainer.step()  # trained: one prompt less in flight, so room for exactly one more
    fed = wait_until(
        lambda: (ids := queued_prompt_ids(io, redis_url, namespace)) and len(ids) >= 3 and ids, 30, "a third prompt"
    )
    assert fed == ["train0", "train1", "train2"]  # not train0 and train1 fed a second time


# -- a prompt that will not produce a group is fed again, then recorded lost -------------------------------------------


def test_a_dead_lettered_prompt_is_fed_again_then_recorded_as_lost(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 2, "What is {i} + {i}?")
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data={"prompts": str(prompts), "max_inflight_groups": 2, "source": {"n_samples": 1}},
    )

    def answer(record, entry_id, copy):
        return "cannot render: too long" if record.prompt_id == "train0" else rollouts_for(record, entry_id)

    worker = ScriptedWorker(redis_url, namespace, answer)
    runtime = make_runtime(config)
    runtime.start()
    stop_worker = _start_worker(io, worker)
    runtime.trainer.step()  # train1 is trained; train0 never produces a group, and training goes on
    lost = wait_until(
        lambda: [e for e in jsonl(tmp_path / "ck" / "prompts.jsonl") if e["event"] == "lost"], 60, "train0 lost"
    )
    stop_worker()
    assert worker.arrivals["train0"] == 1 + config.data.max_refeeds  # fed, then re-fed max_refeeds times
    assert [(e["prompt_id"], e["reason"]) for e in lost] == [("train0", "dead_lettered")]
    assert "cannot render: too long" in lost[0]["detail"]
    samples = scrape(runtime.ops_port)
    assert samples[("opd_trainer_prompts_lost_total", (("reason", "dead_lettered"),))] == 1
    assert samples[("opd_trainer_prompts_refed_total", (("reason", "dead_lettered"),))] == config.data.max_refeeds


def test_a_prompt_without_a_group_in_group_timeout_s_is_fed_again_then_lost(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 1, "What is {i} + {i}?")
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data={"prompts": str(prompts), "source": {"n_samples": 1}, "max_refeeds": 1, "group_timeout_s": 1.0},
    )
    worker = ScriptedWorker(redis_url, namespace, lambda record, entry_id, copy: None)  # takes it, never answers
    runtime = make_runtime(config)
    runtime.start()
    stop_worker = _start_worker(io, worker)
    lost = wait_until(
        lambda: [e for e in jsonl(tmp_path / "ck" / "prompts.jsonl") if e["event"] == "lost"], 60, "train0 lost"
    )
    stop_worker()
    assert worker.arrivals["train0"] == 2 and [e["reason"] for e in lost] == ["timeout"]
    refed = [e for e in jsonl(tmp_path / "ck" / "prompts.jsonl") if e["event"] == "refed"]
    assert [(e["prompt_id"], e["reason"], e["refeeds"]) for e in refed] == [("train0", "timeout", 1)]


def test_a_late_group_of_a_re_fed_prompt_completes_it_once(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    """The first copy hangs past group_timeout_s; both copies answer in the end: one group is trained."""
    prompts = pipeline.write_prompts(tmp_path / "train.jsonl", 1, "What is {i} + {i}?")
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data={"prompts": str(prompts), "source": {"n_samples": 2}, "group_timeout_s": 2.0},
    )
    held: list = []

    def answer(record, entry_id, copy):
        if copy == 0:
            held.append((record, entry_id))
            return None
        return rollouts_for(record, entry_id)[1:]  # the copy answers sample 1; the first copy's sample 0 comes late

    worker = ScriptedWorker(redis_url, namespace, answer)
    runtime = make_runtime(config)
    runtime.start()
    stop_worker = _start_worker(io, worker)
    wait_until(lambda: worker.arrivals["train0"] >= 2, 30, "train0 re-fed")
    record, entry_id = held[0]
    push_rollouts(io, redis_url, namespace, rollouts_for(record, entry_id))  # the hung copy's whole group, late
    runtime.trainer.step()
    stop_worker()
    [step] = _steps(config)
    assert sorted(k for k in step["sample_keys"]) == ["train0/0", "train0/1"]  # one group: each sample once


# -- every wait reports itself and a stop request ends it --------------------------------------------------------------


def test_a_starved_trainer_says_what_it_waits_for_and_stops_when_asked(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime, caplog
):
    config = trainer_config(tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path)
    runtime = make_runtime(config)
    runtime.start()
    caplog.set_level(logging.INFO)
    step = Background(runtime.trainer.step)  # no rollout will come
    wait_until(
        lambda: any("waiting" in r.getMessage() and "rollouts" in r.getMessage() for r in caplog.records),
        30,
        "a log line about the wait for rollouts",
    )
    runtime.stop.request()
    assert step.result(30) is None  # interrupted: nothing trained
    assert runtime.trainer.step_no == 0


def test_a_stop_request_interrupts_the_wait_for_teacher_scores(
    tiny_model_dir, redis_url, namespace, tmp_path, io, make_runtime, caplog
):
    teacher = start_teacher(tiny_model_dir, "hf")
    config = trainer_config(tiny_model_dir, teacher.address, redis_url, namespace, tmp_path, wait_log_s=0.2)
    runtime = make_runtime(config)
    runtime.start()
    teacher.stop()  # the teacher goes away; the client retries until teacher.timeout_s (300 s)
    push_rollouts(io, redis_url, namespace, [rollout("g0", "1-0")])
    caplog.set_level(logging.INFO)
    step = Background(runtime.trainer.step)
    wait_until(
        lambda: len([r for r in caplog.records if "teacher" in r.getMessage() and "waiting" in r.getMessage()]) >= 3,
        30,
        "three of them",
    )
    runtime.stop.request()
    assert step.result(30) is None and runtime.trainer.step_no == 0
    lines = [r for r in caplog.records if "waiting" in r.getMessage() and "teacher" in r.getMessage()]
    gaps = [b.created - a.created for a, b in zip(lines, lines[1:], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), gaps  # at most one line per wait_log_s
    assert pending_rollouts(io, redis_url, namespace) == 1  # not trained, not acknowledged: redelivered next time


# -- the staleness bound holds when the batch is trained ---------------------------------------------------------------


def test_a_batch_that_went_stale_in_the_prefetch_queue_is_dropped_when_trained(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    """The batches left with no group are not steps: nothing published, no LR step, counted."""
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        batch={"prefetch_depth": 1, "max_staleness": 1},
        max_steps=3,
    )
    records = [rollout(f"g{i}", f"{i + 1}-0", version=0) for i in range(4)] + [rollout("g4", "5-0", version=2)]
    push_rollouts(io, redis_url, namespace, records)
    runtime = make_runtime(config)
    runtime.start()
    trainer = runtime.trainer
    trainer.step()  # trains g0 (lag 0), g1 prefetched; publishes v1
    trainer.step()  # trains g1 (lag 1), g2 prefetched at v1; publishes v2
    report = trainer.step()  # g2 and g3 are two versions old at v2: both batches empty, then g4 trains
    first, second, third = _steps(config)
    assert first["rollouts"] == ["g0@1-0/0"] and second["rollouts"] == ["g1@2-0/0"]
    assert third["rollouts"] == ["g4@5-0/0"] and third["dropped_stale"] == 2 and third["empty_steps"] == 2
    assert report.step == trainer.step_no == 3 and report.empty_steps == 2 and trainer.version == 3
    assert trainer.runner.scheduler.last_epoch == 3  # the LR schedule moved once per trained step only
    assert sorted(p.name for p in (tmp_path / "weights").iterdir())[-1] == "v00000003"
    registry = trainer.metrics.registry
    assert registry.get_sample_value("opd_trainer_empty_steps_total") == 2
    assert registry.get_sample_value("opd_trainer_rollouts_total", {"outcome": "dropped_stale"}) == 2


def test_prefetch_never_runs_deeper_than_the_staleness_bound():
    from student_trainer.config import BatchConfig
    from student_trainer.groups.admission import prefetch_depth

    assert prefetch_depth(BatchConfig(prefetch_depth=2, max_staleness=0)) == 0
    assert prefetch_depth(BatchConfig(prefetch_depth=2, max_staleness=4)) == 2
    assert prefetch_depth(BatchConfig(prefetch_depth=2, max_staleness=0, stale_policy="downweight")) == 2


# -- a superseded weight version outlives a grace period ---------------------------------------------------------------


def test_a_superseded_weight_version_is_kept_for_the_prune_grace_period(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    config = trainer_config(
        tiny_model_dir, hf_teacher.address, redis_url, namespace, tmp_path, publish={"keep_last": 1}
    )
    push_rollouts(io, redis_url, namespace, [rollout("g0", "1-0"), rollout("g1", "2-0")])
    runtime = make_runtime(config)
    runtime.start()
    runtime.trainer.step()
    runtime.trainer.step()  # v2 published and announced: a worker may still be loading v1
    versions = sorted(p.name for p in (tmp_path / "weights").iterdir())
    assert versions == ["v00000001", "v00000002"]


# -- an eval round is tied to one policy version -----------------------------------------------------------------------


def test_an_eval_round_keeps_only_samples_of_the_version_it_names(
    tiny_model_dir, hf_teacher, redis_url, namespace, tmp_path, io, make_runtime
):
    held_out = pipeline.write_prompts(tmp_path / "eval.jsonl", 2, "Compute {i} * 3.")
    config = trainer_config(
        tiny_model_dir,
        hf_teacher.address,
        redis_url,
        namespace,
        tmp_path,
        data={"eval_prompts": str(held_out), "source": {"n_samples": 2}},
        eval={"every_steps": 5},
    )

    copies: collections.Counter[str] = collections.Counter()

    def answer(record, entry_id, copy):  # the first copy of eval0 comes from a worker still on version 7
        base = record.prompt_id.partition("@")[0]
        copies[base] += 1
        return rollouts_for(record, entry_id, version=7 if base == "eval0" and copies[base] == 1 else 0)

    worker = ScriptedWorker(redis_url, namespace, answer)
    stop_worker = _start_worker(io, worker)
    runtime = make_runtime(config)
    runtime.start()  # runs the baseline round to its end: the policy before the first step, version 0
    stop_worker()
    [report] = jsonl(tmp_path / "ck" / "evals.jsonl")
    assert report["policy_version"] == 0 and report["policy_versions"] == [0]
    assert report["samples"] == 4 and report["rejected_samples"] == 2 and report["complete"] is True
    assert runtime.trainer.status.eval["policy_version"] == 0
    assert copies == {"eval0": 2, "eval1": 1}  # eval0 was sampled again, at the round's version
