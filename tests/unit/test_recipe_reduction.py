"""The recipe's step arithmetic (OPSD on verl) reachable with options, against a float64 re-implementation.

The reference re-implements `opd_worker.py` `_opd_training_step` and `opd_trainer.py` of
HJSang/OPSD_OnPolicyDistillation (65ad87b) in float64: the rank's batch split in order into micro-batches of
`ppo_micro_batch_size_per_gpu` sequences, each micro-batch's loss the token mean of the full-vocabulary reverse
KL (`divergence_losses.compute_reverse_kl_loss`) or, with `reward_beta`, sum_i w_i m_i / sum_i w_i over the
micro-batch's sequences (m_i a sequence's token mean; w = n softmax(binary reward / beta) over the batch), the
backward of loss / M (M = micro-batches). opd runs the same micro-batches, built from rollout records by
`batching.split_by_sequences` + `build_micro_batch`, each with `planning.micro_batch_denominators`.

Tolerance: float64 (u ~ 1.1e-16) over a few hundred terms of magnitude <= ~10: 1e-12 absolute has margin of
orders, while the step-wide token mean (opd's default) differs from the recipe's by >= 1e-3 here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protos.records import RolloutRecord
from student_trainer.batching import build_micro_batch, split_by_sequences
from student_trainer.loss import weighting as wt
from student_trainer.loss.compute import TeacherTensors, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.planning import Denominators, count_denominators, micro_batch_denominators

pytestmark = pytest.mark.timeout(60)

H, V = 6, 19
LENGTHS = [3, 7, 2, 5, 4, 6, 1, 8, 3]  # response lengths of 9 sequences: micro-batches of 4, 4, 1
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
ATOL = 1e-12


def _records() -> list[RolloutRecord]:
    out = []
    for i, (n, reward) in enumerate(zip(LENGTHS, REWARDS, strict=True)):
        prompt = np.array([1, 2], np.int32)
        response = np.arange(n, dtype=np.int32) % V
        out.append(
            RolloutRecord(
                f"r{i}",
                f"p{i}",
                f"g{i}",
                1,
                "train",
                prompt,
                response,
                np.ones(n, np.uint8),
                np.zeros(n, np.float32),
                reward,
            )
        )
    out[4].response_mask[1] = 0  # a tool token: no loss, not counted
    return out


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(3 * torch.randn(n, V, generator=g, dtype=torch.float64), -1)
    return hidden, weight, teacher


def _bounds() -> list[int]:
    return np.concatenate([[0], np.cumsum(LENGTHS)]).tolist()


def recipe_step(hidden, weight, teacher_full, mask, k: int, reward_beta: float | None):
    """Float64 re-implementation of the recipe's `_opd_training_step` on one rank: returns (loss, dh, dw)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bounds = _bounds()
    seqs = list(range(len(LENGTHS)))
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    sample_w = None if reward_beta is None else torch.softmax(rewards / reward_beta, 0) * len(rewards)
    micro = [seqs[i : i + k] for i in range(0, len(seqs), k)]
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro:
        per_seq = []
        for s in mb:
            rows = [r for r in range(bounds[s], bounds[s + 1]) if mask[r]]  # response (loss-mask) rows
            s_lp = torch.log_softmax(h[rows] @ w.T, -1)
            t_lp = teacher_full[rows]
            per_seq.append((s_lp.exp() * (s_lp - t_lp)).sum(-1))  # KL(p_S || p_T) per token
        if sample_w is None:
            loss = torch.cat(per_seq).sum() / sum(x.numel() for x in per_seq)  # token mean of the micro-batch
        else:
            means = torch.stack([x.mean() if x.numel() else x.new_zeros(()) for x in per_seq])
            mb_w = sample_w[mb]
            loss = (means * mb_w).sum() / mb_w.sum()
        total = total + loss / len(micro)  # scaled_loss = loss / grad_accum
    total.backward()
    return total.detach(), h.grad, w.grad


def opd_step(hidden, weight, teacher_full, cfg: LossConfig, k: int, world_size: int = 1):
    """opd's path: records -> split_by_sequences -> build_micro_batch -> per-micro-batch D -> loss per micro-batch."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    records = _records()
    bounds = _bounds()
    index = {r.rollout_id: i for i, r in enumerate(records)}
    bins = split_by_sequences([[r] for r in records], k)
    micro = [build_micro_batch(b, {}) for b in bins]
    counts = [count_denominators(mb.inputs, cfg) for mb in micro]
    total = sum(counts, Denominators(0.0, 0.0))
    dens = micro_batch_denominators(counts, total, len(micro), world_size, cfg)
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    batch_w = wt.batch_reward_softmax_weights(wt.binarised(rewards, cfg.pass_threshold), cfg.reward_softmax.beta)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for mb, den in zip(micro, dens, strict=True):
        rows = [
            r for rec in mb.records for r in range(bounds[index[rec.rollout_id]], bounds[index[rec.rollout_id] + 1])
        ]
        full = teacher_full[rows]
        teacher = TeacherTensors(
            token_logprobs=full.gather(1, mb.inputs.target_ids[:, None]).squeeze(1), full_logprobs=full
        )
        inputs = mb.inputs
        if cfg.reward_softmax.enabled:  # the step's weights, as StepRunner.group_terms passes them
            ids = torch.tensor([index[r.rollout_id] for r in mb.records])
            inputs = type(inputs)(**{**inputs.__dict__, "sample_weights": batch_w[ids]})
        loss, _ = compute_distillation_loss(h[rows], w, inputs, teacher, cfg, 0, denominators=den)
        loss_sum = loss_sum + loss * world_size  # the trainer's backward of W x loss (FSDP then averages)
    loss_sum.backward()
    return loss_sum.detach() / world_size, h.grad / world_size, w.grad / world_size


def _mask() -> torch.Tensor:
    return torch.from_numpy(np.concatenate([r.response_mask for r in _records()]).astype(bool))


RECIPE = dict(divergence="rkl", support="full", reduction="micro_batch_mean", chunk_size=4)


@pytest.mark.parametrize("k", [4, 3, 1])
def test_micro_batch_mean_of_token_means_is_the_recipes_step(k):
    hidden, weight, teacher = _tensors()
    want = recipe_step(hidden, weight, teacher, _mask(), k, reward_beta=None)
    got = opd_step(hidden, weight, teacher, LossConfig(**RECIPE), k)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)


def test_the_rank_average_divides_by_the_world_size_as_fsdp_does():
    """On one of W ranks, each micro-batch's share is 1/W of the rank's: the sum over ranks is their mean."""
    hidden, weight, teacher = _tensors(seed=1)
    one = opd_step(hidden, weight, teacher, LossConfig(**RECIPE), 4, world_size=1)
    four = opd_step(hidden, weight, teacher, LossConfig(**RECIPE), 4, world_size=4)
    for a, b in zip(one, four, strict=True):  # loss and grads of rank r, before FSDP's mean: 1/W of one rank's
        torch.testing.assert_close(a / 4, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_the_micro_batch_reward_form_is_the_recipes_reward_beta(beta):
    hidden, weight, teacher = _tensors(seed=2)
    want = recipe_step(hidden, weight, teacher, _mask(), 4, reward_beta=beta)
    cfg = LossConfig(
        **RECIPE, normalization="sequence_mean", reward_softmax={"enabled": True, "beta": beta, "form": "micro_batch"}
    )
    got = opd_step(hidden, weight, teacher, cfg, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)


def test_the_step_wide_defaults_are_not_the_recipes_step():
    """The test can fail: opd's default reduction and the batch_binary form differ from the recipe's here."""
    hidden, weight, teacher = _tensors()
    want = recipe_step(hidden, weight, teacher, _mask(), 4, reward_beta=None)
    got = opd_step(hidden, weight, teacher, LossConfig(divergence="rkl", support="full", chunk_size=4), 4)
    assert abs(got[0].item() - want[0].item()) > 1e-3
    want_w = recipe_step(hidden, weight, teacher, _mask(), 4, reward_beta=0.5)
    cfg = LossConfig(**RECIPE, normalization="sequence_mean", reward_softmax={"enabled": True, "beta": 0.5})
    assert abs(opd_step(hidden, weight, teacher, cfg, 4)[0].item() - want_w[0].item()) > 1e-3


def test_homogeneous_micro_batches_cancel_the_micro_batch_softmax():
    w = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(wt.micro_batch_renormalised(w, torch.ones(3)), torch.ones(3, dtype=torch.float64))


def test_split_by_sequences_keeps_order_and_cuts_groups():
    records = _records()
    bins = split_by_sequences([records[:5], records[5:]], 4)
    assert [[r.rollout_id for r in b[0]] for b in bins] == [
        ["r0", "r1", "r2", "r3"],
        ["r4", "r5", "r6", "r7"],
        ["r8"],
    ]


def test_the_micro_batch_form_needs_sequence_means():
    with pytest.raises(ValueError, match="normalization='sequence_mean'"):
        LossConfig(reward_softmax={"enabled": True, "form": "micro_batch"})


# ------------------------------------------------------------------ GRPO options as verl


def verl_policy_loss(ratio, adv, clip_low, clip_high, c):
    """verl core_algos.compute_policy_loss (vanilla), per token, with dual-clip c."""
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.minimum(-adv * c, clip1)
    return torch.where(adv < 0, clip2, clip1)


def test_dual_clip_matches_verls_policy_loss_and_its_gradient():
    from student_trainer.loss.divergences import policy_gradient_rows

    g = torch.Generator().manual_seed(3)
    logp = torch.randn(64, generator=g, dtype=torch.float64) - 1
    behaviour = logp + 2 * torch.randn(64, generator=g, dtype=torch.float64)  # ratios from ~e^-6 to ~e^6
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    x = logp.clone().requires_grad_()
    want = verl_policy_loss((x - behaviour).exp(), adv, 0.2, 0.28, 3.0)
    want.sum().backward()
    loss, grad = policy_gradient_rows(logp, adv, behaviour, 0.2, 0.28, 3.0)
    torch.testing.assert_close(loss, want.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=ATOL)
    capped = (adv < 0) & ((logp - behaviour).exp() > 3.0)
    assert bool(capped.any())  # the cap is exercised


def test_singleton_groups_get_verls_advantage_under_the_reward_rule():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    groups = torch.tensor([0, 1, 1, 2])
    eps = 1e-6
    adv = wt.grpo_advantages(rewards, groups, True, eps, singleton="reward")
    pair = torch.tensor([0.0, 1.0], dtype=torch.float64)
    want = torch.tensor([1.0 / (1 + eps), 0.0, 0.0, 0.5 / (1 + eps)], dtype=torch.float64)
    want[1:3] = (pair - pair.mean()) / (pair.std() + eps)
    torch.testing.assert_close(adv, want, rtol=0, atol=ATOL)
    assert wt.grpo_advantages(rewards, groups, True, eps)[[0, 3]].tolist() == [0.0, 0.0]
    assert wt.grpo_advantages(rewards, groups, False, eps, singleton="reward")[0].item() == 1.0
    assert not math.isnan(adv.sum().item())
