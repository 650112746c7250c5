"""GRPO mini-batch updates (`batch.mini_batches`) against a float64 re-implementation of verl's PPO loop.

The reference is verl's `dp_actor.update_policy` (volcengine/verl, `verl/workers/actor/dp_actor.py`), written
again on the plain Hugging Face model: the batch's GRPO advantages (`compute_grpo_outcome_advantage`: group mean
and unbiased std + 1e-6) computed once; the batch cut into mini-batches in order (`data.split`, no shuffle), each
into micro-batches of `ppo_micro_batch_size_per_gpu` sequences; per micro-batch the vanilla clipped surrogate
with dual-clip (`compute_policy_loss_vanilla`, ratio against the fixed old log-probs), token mean over the
micro-batch, times 1 / gradient_accumulation; per mini-batch clip_grad_norm_ and one AdamW step; the LR schedule
once per batch (`fsdp_workers.update_actor`). The old log-probs are the initial policy's (verl recomputes them
with the actor before the update; opd's records carry the sampler's, here equal to them in float32).

Tolerance: both sides are float64 and add the same terms in other orders (< 200 per gradient element), so the
gradients agree to ~1e-14 of their scale. AdamW's first update lr * g / (|g| + eps) moves by at most
lr * |dg| / eps, and its second by the same bound again, so a parameter differs by well under lr * 1e-8 (eps =
1e-8, |dg| <= 1e-16 absolute for these O(1e-2) gradients); the updates themselves are O(lr) per element, and a
wrong loop (one update, a stale ratio, the LR stepped per mini-batch) moves parameters by a visible share of
lr. The warm-up makes the LR of step 1 differ from that of step 2, so the schedule's cadence is tested too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.model import init_distributed
from student_trainer.optim import lr_factor
from student_trainer.publish import version_dir
from student_trainer.runtime import TrainerRuntime
from student_trainer.step import split_mini_batches
from tests.fixtures.mini_batch_step import (
    CLIP,
    DUAL,
    LR,
    grpo_config,
    one_rank_order,
    opd_update,
    response_logprobs,
    rewarded_groups,
    student,
)
from tests.fixtures.rollout import make_rollout
from tests.fixtures.torchrun import run_torchrun
from tests.fixtures.trainer_runtime import jsonl, pending_rollouts, push_rollouts, trainer_config

pytestmark = pytest.mark.timeout(300)

MICRO = 4


def _config(model_dir: str, mini_batches: int, importance: str = "ppo_clip") -> TrainerConfig:
    return grpo_config(model_dir, mini_batches, importance, micro_batch_sequences=MICRO)


def _grpo_advantages(groups: list[list[RolloutRecord]]) -> dict[str, float]:
    """verl's compute_grpo_outcome_advantage: (r - mean) / (std + 1e-6), std unbiased, per group."""
    out = {}
    for group in groups:
        rewards = torch.tensor([r.reward for r in group], dtype=torch.float64)
        scores = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        out.update({r.rollout_id: float(a) for r, a in zip(group, scores, strict=True)})
    return out


def _verl_update_policy(model_dir: str, groups, mini_batches: int) -> tuple[dict[str, torch.Tensor], float]:
    """verl's loop in float64 on the plain model: the parameters after one batch, and the share of the tokens of
    mini-batches 2.. whose ratio was outside the clip range (the clip's work)."""
    lm = student(model_dir)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    config = _config(model_dir, mini_batches).optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, 10))
    advantages = _grpo_advantages(groups)
    records = [r for g in groups for r in g]
    size = len(records) // mini_batches  # ppo_mini_batch_size x n sequences
    clipped, later = 0, 0
    for j in range(mini_batches):
        mini = records[j * size : (j + 1) * size]
        micro_batches = [mini[i : i + MICRO] for i in range(0, len(mini), MICRO)]
        optimizer.zero_grad()
        for micro in micro_batches:
            losses, mask = [], []
            for r in micro:
                log_prob = response_logprobs(lm, r)
                old = torch.from_numpy(r.behaviour_logprobs).double()
                adv = torch.full_like(log_prob, advantages[r.rollout_id])
                ratio = torch.exp(torch.clamp(log_prob - old, -20.0, 20.0))
                pg1 = -adv * ratio
                pg2 = -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
                clip1 = torch.maximum(pg1, pg2)
                clip2 = torch.minimum(-adv * DUAL, clip1)
                losses.append(torch.where(adv < 0, clip2, clip1))
                m = torch.from_numpy(r.response_mask.astype(np.float64))
                mask.append(m)
                if j > 0:
                    outside = ((ratio < 1 - CLIP) | (ratio > 1 + CLIP)).double() * m
                    clipped, later = clipped + int(outside.sum()), later + int(m.sum())
            loss_mat, mask_mat = torch.cat(losses), torch.cat(mask)
            token_mean = (loss_mat * mask_mat).sum() / mask_mat.sum()
            (token_mean / len(micro_batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        assert torch.isfinite(norm)
        optimizer.step()
    optimizer.zero_grad()
    scheduler.step()  # update_actor: once per batch
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}, clipped / max(later, 1)


def _opd_update(model_dir: str, groups, mini_batches: int, importance: str = "ppo_clip"):
    return opd_update(_config(model_dir, mini_batches, importance), groups, groups)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


@pytest.mark.slow
def test_two_mini_batches_update_as_verls_ppo_loop(tiny_model_dir):
    model_dir = str(tiny_model_dir)
    groups = rewarded_groups(model_dir)
    want, clipped_share = _verl_update_policy(model_dir, groups, 2)
    got, runner, stats, grad_norm = _opd_update(model_dir, groups, 2)
    assert 0.05 < clipped_share < 0.95  # the second update's ratio is clipped on some of its tokens, not all
    assert _max_diff(got, want) < LR * 1e-8
    initial = {k: v.double() for k, v in student(model_dir).state_dict().items()}
    assert _max_diff(got, initial) > 0.1 * LR  # it trained
    assert runner.scheduler.last_epoch == 1  # the LR schedule moved once for the batch
    states = [s["step"] for s in runner.optimizer.state.values()]
    assert states and all(int(s) == 2 for s in states)  # two AdamW updates
    assert stats["tokens"] == sum(int(r.response_mask.sum()) for g in groups for r in g)
    assert np.isfinite(grad_norm) and grad_norm > 0

    one, _ = _verl_update_policy(model_dir, groups, 1)  # one update per batch is another result
    assert _max_diff(one, want) > 0.1 * LR
    on_policy, *_ = _opd_update(model_dir, groups, 1, importance="ppo_clip")
    assert _max_diff(on_policy, one) < LR * 1e-8  # mini_batches=1 is verl's single update too


def test_mini_batches_hold_whole_groups_in_the_shares_order():
    groups = [[f"g{i}"] * (1 + i % 3) for i in range(7)]
    parts = split_mini_batches(groups, 3)  # type: ignore[arg-type]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert [g for p in parts for g in p] == groups
    assert split_mini_batches(groups[:2], 4)[2:] == [[], []]  # type: ignore[arg-type]


def test_mini_batches_with_an_on_policy_gradient_term_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="loss.policy_gradient.importance=ppo_clip"):
        _config(str(tiny_model_dir), 2, importance="none")
    fkl = TrainerConfig.model_validate(
        {"model": str(tiny_model_dir), "loss": {"divergence": "fkl"}, "batch": {"mini_batches": 2}}
    )
    assert fkl.batch.mini_batches == 2  # a top-k divergence has no ratio: allowed


@pytest.fixture
def io():
    loop = LoopThread("test-grpo-mini-batches-io")
    yield loop
    loop.stop()


def _rewarded_group(prompt: str, rewards: list[float]) -> list[RolloutRecord]:
    records = []
    for i, reward in enumerate(rewards):
        r = make_rollout(i, num_tokens=10, prompt_id=prompt)
        r.group_size, r.reward, r.policy_version = len(rewards), reward, 0
        r.sampling_temperature, r.sampling_top_p = 1.0, 1.0
        records.append(r)
    return records


def test_version_publish_acks_and_max_steps_advance_once_per_batch(tiny_model_dir, redis_url, namespace, tmp_path, io):
    """Two batches of two groups, two mini-batch updates each, in the trainer runtime (private Redis, no teacher):
    two steps, two versions, the LR schedule moved twice, four AdamW updates, and the rollouts acknowledged only
    when the checkpoint after the second batch commits."""
    groups = [_rewarded_group(p, [1.0, 0.0]) for p in ("a", "b", "c", "d")]
    push_rollouts(io, redis_url, namespace, [r for g in groups for r in g])
    config = trainer_config(
        tiny_model_dir,
        "127.0.0.1:1",  # nothing listens: no teacher is asked
        redis_url,
        namespace,
        tmp_path,
        loss={
            "divergence": "rkl_sampled",
            "distill_weight": 0.0,
            "rl_weight": 1.0,
            "policy_gradient": {"importance": "ppo_clip"},
        },
        batch={"groups_per_step": 2, "mini_batches": 2},
        optim={"lr": 1e-3},
        max_steps=2,
    )
    data = config.model_dump()
    data["teacher"]["enabled"] = False
    config = TrainerConfig.model_validate(data)
    runtime = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        runtime.start()
        trainer = runtime.trainer
        first = trainer.step()
        assert first is not None and (trainer.step_no, trainer.version) == (1, 1)
        assert pending_rollouts(io, redis_url, namespace) == 8  # not acked before the checkpoint (step 2)
        second = trainer.step()
        assert second is not None and (trainer.step_no, trainer.version) == (2, 2)
        assert trainer.runner.scheduler.last_epoch == 2
        steps = {int(s["step"]) for s in trainer.runner.optimizer.state.values()}
    finally:
        runtime.close()
    assert steps == {4}  # 2 batches x 2 mini-batch updates
    assert pending_rollouts(io, redis_url, namespace) == 0  # acked once the checkpoint after step 2 committed
    assert [s["step"] for s in jsonl(tmp_path / "ck" / "steps.jsonl")] == [1, 2]
    assert version_dir(config.publish.uri, 1).exists() and version_dir(config.publish.uri, 2).exists()
    assert not version_dir(config.publish.uri, 3).exists()
    assert first.tokens == second.tokens == 4 * 10

    # resumed from the checkpoint of step 2: the schedule and AdamW go on from there, one step per batch
    push_rollouts(io, redis_url, namespace, [r for p in ("e", "f") for r in _rewarded_group(p, [0.0, 1.0])])
    resumed = config.model_copy(
        update={"max_steps": 3, "checkpoint": config.checkpoint.model_copy(update={"resume": True})}
    )
    runtime = TrainerRuntime(resumed, init_distributed(resumed.dist), io)
    try:
        runtime.start()
        trainer = runtime.trainer
        assert trainer.step() is not None and (trainer.step_no, trainer.version) == (3, 3)
        assert trainer.runner.scheduler.last_epoch == 3
        steps = {int(s["step"]) for s in trainer.runner.optimizer.state.values()}
    finally:
        runtime.close()
    assert steps == {6}
    assert pending_rollouts(io, redis_url, namespace) == 0
    assert [s["step"] for s in jsonl(tmp_path / "ck" / "steps.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_two_ranks_update_as_one_rank_on_the_same_mini_batches(tiny_model_dir, tmp_path):
    """Each of two FSDP2 ranks cuts its own share; mini-batch j is the union of the ranks' parts j, and the
    batch's parameters equal one process's on those unions (loss.reduction=step: the cut into micro-batches
    and ranks does not change a mini-batch's step; float64, same bound as above)."""
    model_dir = str(tiny_model_dir)
    out = tmp_path / "two.pt"
    run_torchrun(2, "tests.fixtures.mini_batch_step", model_dir, str(out), log_dir=tmp_path / "ranks", timeout_s=280)
    two = torch.load(out, weights_only=False)["state"]
    groups = rewarded_groups(model_dir)
    config = grpo_config(model_dir, 2, micro_batch_sequences=0, reduction="step")
    one, *_ = opd_update(config, groups, one_rank_order(groups, 2, 2))
    assert _max_diff(two, one) < LR * 1e-8
    other, *_ = opd_update(config, groups, groups)  # mini-batches of consecutive groups: another result
    assert _max_diff(other, one) > 0.01 * LR
