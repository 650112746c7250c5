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
from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
from student_trainer.optim import build_optimizer, lr_factor
from student_trainer.publish import full_state_dict, version_dir
from student_trainer.runtime import TrainerRuntime
from student_trainer.step import StepRunner, split_mini_batches
from tests.fixtures.rollout import make_rollout
from tests.fixtures.trainer_runtime import jsonl, pending_rollouts, push_rollouts, trainer_config

pytestmark = pytest.mark.timeout(300)

LR, WARMUP, MICRO, CLIP, DUAL = 0.002, 4, 4, 0.2, 3.0
GROUPS, GROUP_SIZE = 8, 2


def _config(model_dir: str, mini_batches: int, importance: str = "ppo_clip") -> TrainerConfig:
    pg = {"importance": importance}
    if importance == "ppo_clip":
        pg["dual_clip"] = DUAL
    data = {
        "model": model_dir,
        "loss": {
            "divergence": "rkl_sampled",
            "distill_weight": 0.0,
            "rl_weight": 1.0,
            "reduction": "micro_batch_mean",
            "policy_gradient": pg,
        },
        "optim": {"lr": LR, "weight_decay": 0.1, "warmup_steps": WARMUP, "max_grad_norm": 1.0},
        "batch": {"micro_batch_sequences": MICRO, "mini_batches": mini_batches},
        "dist": {"backend": "gloo", "mixed_precision": "none"},
    }
    data["teacher"] = {"enabled": False}
    return TrainerConfig.model_validate(data)


def _student(model_dir: str) -> torch.nn.Module:
    return load_student(model_dir, torch.device("cpu"), dtype=torch.float64)


def _response_logprobs(lm: torch.nn.Module, record: RolloutRecord) -> torch.Tensor:
    """[R] log p(response token | everything before it), float64."""
    ids = torch.from_numpy(np.concatenate([record.prompt_ids, record.response_ids]).astype(np.int64))
    logits = lm(input_ids=ids[None]).logits[0].double()
    start = len(record.prompt_ids)
    logp = torch.log_softmax(logits[start - 1 : -1], -1)
    return logp.gather(1, ids[start:, None]).squeeze(1)


def _groups(model_dir: str) -> list[list[RolloutRecord]]:
    """8 groups of 2, rewards 0/1 differing inside most groups; behaviour log-probs = the initial policy's."""
    lm = _student(model_dir)
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    rng = np.random.default_rng(11)
    groups = []
    for g in range(GROUPS):
        group = []
        for s in range(GROUP_SIZE):
            n = int(rng.integers(5, 10))
            record = RolloutRecord(
                rollout_id=f"g{g}s{s}",
                prompt_id=f"p{g}",
                group_id=f"p{g}",
                group_size=GROUP_SIZE,
                split="train",
                prompt_ids=rng.integers(0, vocab, int(rng.integers(3, 6))).astype(np.int32),
                response_ids=rng.integers(0, vocab, n).astype(np.int32),
                response_mask=(rng.random(n) > 0.15).astype(np.uint8),
                behaviour_logprobs=np.zeros(n, np.float32),
                reward=float((s + g) % 2) if g != 3 else 1.0,  # group 3: equal rewards, advantage 0
                sampling_temperature=1.0,
                sampling_top_p=1.0,
            )
            with torch.no_grad():
                record.behaviour_logprobs = _response_logprobs(lm, record).numpy().astype(np.float32)
            group.append(record)
        groups.append(group)
    return groups


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
    lm = _student(model_dir)
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
                log_prob = _response_logprobs(lm, r)
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
    config = _config(model_dir, mini_batches, importance)
    info = init_distributed(config.dist)
    root = shard_student(StudentLoss(_student(model_dir), config.loss), config.dist, info.device)
    optimizer, scheduler = build_optimizer(root, config.optim, 10)
    runner = StepRunner(root, optimizer, scheduler, config, info, top_k=0, teacher_temperature=1.0)
    stats, grad_norm = runner.update(groups, groups, {}, {}, step=0)
    return full_state_dict(root), runner, stats, grad_norm


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


@pytest.mark.slow
def test_two_mini_batches_update_as_verls_ppo_loop(tiny_model_dir):
    model_dir = str(tiny_model_dir)
    groups = _groups(model_dir)
    want, clipped_share = _verl_update_policy(model_dir, groups, 2)
    got, runner, stats, grad_norm = _opd_update(model_dir, groups, 2)
    assert 0.05 < clipped_share < 0.95  # the second update's ratio is clipped on some of its tokens, not all
    assert _max_diff(got, want) < LR * 1e-8
    initial = {k: v.double() for k, v in _student(model_dir).state_dict().items()}
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
