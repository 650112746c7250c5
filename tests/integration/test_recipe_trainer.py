"""The recipe end to end in the trainer runtime (tiny model, private Redis, rollouts pushed straight onto
`{ns}:rollouts`): pure GRPO with a KL penalty to the frozen initial student and no teacher at all; a rollout
without a reward still trained and counted; and a rollout sampled at another temperature refused at the first
step, left pending in Redis.

The teacher address is 127.0.0.1:1, where nothing listens: a run that asked a teacher anything would fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from opd.loop_thread import LoopThread
from opd.streams import ROLLOUT_GROUP, StreamKeys
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.model import init_distributed
from student_trainer.runtime import TrainerRuntime
from student_trainer.step import SamplingMismatch
from tests.fixtures.rollout import make_rollout
from tests.fixtures.split_step import make_runner, synthetic_groups
from tests.fixtures.trainer_runtime import push_rollouts, redis_call, trainer_config

pytestmark = pytest.mark.timeout(240)

NO_TEACHER = "127.0.0.1:1"


@pytest.fixture
def io():
    loop = LoopThread("test-recipe-io")
    yield loop
    loop.stop()


def group(prompt: str, rewards: list[float | None], temperature: float = 1.0) -> list[RolloutRecord]:
    records = []
    for i, reward in enumerate(rewards):
        r = make_rollout(i, num_tokens=12, prompt_id=prompt)
        r.group_size, r.reward, r.policy_version = len(rewards), reward, 0
        r.sampling_temperature, r.sampling_top_p = temperature, 1.0
        records.append(r)
    return records


def grpo_config(model: Path, redis_url: str, namespace: str, run: Path, **loss) -> TrainerConfig:
    config = trainer_config(
        model,
        NO_TEACHER,
        redis_url,
        namespace,
        run,
        loss={"divergence": "rkl_sampled", "distill_weight": 0.0, "rl_weight": 1.0, **loss},
        optim={"lr": 1e-2},
        max_steps=2,
    )
    data = config.model_dump()
    data["teacher"]["enabled"] = False  # pure RL: the `none` score source
    return TrainerConfig.model_validate(data)


def test_grpo_with_kl_trains_without_a_teacher(tiny_model_dir, redis_url, namespace, tmp_path, io):
    push_rollouts(io, redis_url, namespace, group("a", [1.0, 0.0, None]) + group("b", [0.0, 1.0, 1.0]))
    config = grpo_config(tiny_model_dir, redis_url, namespace, tmp_path, kl={"coef": 0.5, "estimator": "k3"})
    runtime = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        runtime.start()
        assert runtime.trainer.runner.reference is not None
        first = runtime.trainer.step().stats()
        second = runtime.trainer.step().stats()
    finally:
        runtime.close()
    # step 1: the policy is its own reference, so the k3 estimate is exactly 0; one update later it is not
    assert first["reference_kl"] == 0.0 and second["reference_kl"] > 1e-6
    assert first["rewards_missing"] == 1 and first["rewards_scored"] == 2 and first["pass_rate"] == 0.5
    assert first["tokens"] == 3 * 12  # the sample without a reward is still trained (distillation side)
    for stats in (first, second):
        assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
        assert "mean_divergence" not in stats and "teacher_p_sampled" not in stats  # no teacher, no teacher stats
    steps = [json.loads(line) for line in (tmp_path / "ck" / "steps.jsonl").read_text().splitlines()]
    assert [s["stats"]["rewards_missing"] for s in steps] == [1.0, 0.0]


def test_a_rollout_sampled_at_another_temperature_stops_the_run_and_stays_in_redis(
    tiny_model_dir, redis_url, namespace, tmp_path, io
):
    push_rollouts(io, redis_url, namespace, group("a", [1.0, 0.0], temperature=0.6))
    config = grpo_config(tiny_model_dir, redis_url, namespace, tmp_path)
    runtime = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        runtime.start()
        with pytest.raises(SamplingMismatch) as err:
            runtime.trainer.step()
    finally:
        runtime.close()
    assert "temperature 0.6" in str(err.value) and "assumes temperature 1" in str(err.value)
    keys = StreamKeys(namespace)
    pending = redis_call(io, redis_url, lambda r: r.xpending(keys.rollouts, ROLLOUT_GROUP))
    length = redis_call(io, redis_url, lambda r: r.xlen(keys.rollouts))
    assert int(pending["pending"]) == 2 and length == 2  # read, never acknowledged: a fixed run meets them again
    assert not (tmp_path / "ck" / "steps.jsonl").exists()

    warned = config.model_copy(update={"batch": config.batch.model_copy(update={"sampling_mismatch": "warn"})})
    push_rollouts(io, redis_url, namespace, group("b", [1.0, 0.0], temperature=0.6))
    runtime = TrainerRuntime(warned.model_copy(update={"max_steps": 1}), init_distributed(config.dist), io)
    try:
        runtime.start()
        report = runtime.trainer.step()  # allowed by the switch: trained
        stats = report.stats() if report is not None else None
    finally:
        runtime.close()
    assert stats is not None and stats["tokens"] == 2 * 12


def test_the_step_reports_teacher_diagnostics_over_its_trained_tokens(tiny_model_dir):
    """StepRunner on the split-step fixture (float64 student, one gloo rank): the step's teacher diagnostics are
    the token means over every trained token of every micro-batch (float64 sums of < 300 terms: rel 1e-12)."""
    runner = make_runner(str(tiny_model_dir), 60, "token_mean")
    groups, scores = synthetic_groups(runner.vocab_size)
    groups[0][0].reward = None
    stats = runner.forward_backward(groups, groups, {}, scores, step=0)
    p, inside, entropy, n = 0.0, 0.0, 0.0, 0
    for r in (r for g in groups for r in g):
        s, mask = scores[r.rollout_id], r.response_mask.astype(bool)
        buckets = np.concatenate([s.topk_logprobs, s.tail_logprobs[:, None]], 1)[mask].astype(np.float64)
        p += float(np.exp(s.token_logprobs[mask]).sum())
        inside += float((s.topk_ids[mask] == r.response_ids[mask][:, None]).any(1).sum())
        entropy += float(-(np.exp(buckets) * buckets).sum())
        n += int(mask.sum())
    assert stats["tokens"] == n
    assert stats["teacher_p_sampled"] == pytest.approx(p / n, rel=1e-12)
    assert stats["sampled_in_teacher_topk"] == pytest.approx(inside / n, rel=1e-12)
    assert stats["teacher_entropy_topk_tail"] == pytest.approx(entropy / n, rel=1e-12)
    assert stats["rewards_missing"] == 1 and stats["rewards_scored"] == sum(len(g) for g in groups) - 1
