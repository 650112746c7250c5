"""Specification of the terms around the divergence: the GRPO term and its mix
with distillation, importance ratios, discounted sampled-token advantages,
TIP token selection, sample weights and normalisation, end to end through
`compute_distillation_loss` against small float64 references.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.loss.compute import LossInputs, TeacherTensors, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.fused_linear import chunk_rows
from student_trainer.loss.planning import plan_rows, prescore_rows

pytestmark = pytest.mark.timeout(120)

N, H, V, K = 16, 5, 23, 4
TOL = dict(rtol=1e-9, atol=1e-11)
CU_SEQLENS = torch.tensor([0, 3, 7, 12, 16])
GROUP_IDS = torch.tensor([0, 0, 1, 1])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)


def make_batch(seed: int = 0, behaviour_noise: float | None = None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher_full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.ones(N, dtype=torch.float64)
    weights[[2, 8, 9]] = 0.0
    behaviour = None
    if behaviour_noise is not None:
        s_y = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
        behaviour = s_y + behaviour_noise * torch.randn(N, generator=g, dtype=torch.float64)
    ids = teacher_full.topk(K, -1).indices
    in_topk = torch.zeros_like(teacher_full, dtype=torch.bool).scatter(1, ids, True)
    teacher = TeacherTensors(
        token_logprobs=teacher_full.gather(1, targets[:, None]).squeeze(1),
        topk_ids=ids,
        topk_logprobs=teacher_full.gather(1, ids),
        tail_logprobs=teacher_full.masked_fill(in_topk, -math.inf).logsumexp(-1),
        full_logprobs=teacher_full,
    )
    inputs = LossInputs(targets, weights, CU_SEQLENS, GROUP_IDS, REWARDS, behaviour)
    return hidden, weight, inputs, teacher


def run(hidden, weight, inputs, teacher, cfg, step: int = 0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, stats = compute_distillation_loss(h, w, inputs, teacher, cfg, step)
    loss.backward()
    return loss.detach(), h.grad, w.grad, stats


def reference(hidden, weight, inputs, row_loss_fn, row_weights=None, denom=None):
    """sum_i u_i l_i / sum_i m_i with autograd, l from `row_loss_fn(s, s_y)`."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    s = torch.log_softmax(h @ w.T, -1)
    s_y = s.gather(1, inputs.target_ids[:, None]).squeeze(1)
    u = inputs.loss_weights if row_weights is None else row_weights
    loss = (u * row_loss_fn(s, s_y)).sum() / (inputs.loss_weights.sum() if denom is None else denom)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def seq_of_rows() -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(4), CU_SEQLENS.diff())


def grpo_advantage_rows() -> torch.Tensor:
    """(r - group mean) / (unbiased group std + 1e-6), written out per group."""
    adv = torch.zeros(4, dtype=torch.float64)
    for group in (0, 1):
        members = GROUP_IDS.eq(group).nonzero().flatten()
        r = REWARDS[members]
        adv[members] = (r - r.mean()) / (r.std() + 1e-6)
    return adv[seq_of_rows()]


def sampled_rkl_rows(teacher):
    return lambda s, s_y: -(teacher.token_logprobs - s_y).detach() * torch.exp(s_y - s_y.detach())


def grpo_rows(s, s_y):
    return -grpo_advantage_rows() * torch.exp(s_y - s_y.detach())


def assert_close_all(got, want):
    for g, r in zip(got, want, strict=False):
        torch.testing.assert_close(g, r, **TOL)


# ----------------------------------------------------------------------------- RL term


def test_a0_b1_is_pure_grpo():
    hidden, weight, inputs, teacher = make_batch()
    got = run(hidden, weight, inputs, teacher, LossConfig(distill_weight=0.0, rl_weight=1.0, chunk_size=5))
    assert_close_all(got[:3], reference(hidden, weight, inputs, grpo_rows))
    assert got[3].rl_loss == pytest.approx(got[0].item())
    opd_value = reference(hidden, weight, inputs, sampled_rkl_rows(teacher))[0]
    assert got[3].distill_loss == pytest.approx(opd_value.item())  # still reported, with weight 0


def test_a1_b0_is_pure_on_policy_distillation():
    hidden, weight, inputs, teacher = make_batch()
    got = run(hidden, weight, inputs, teacher, LossConfig(distill_weight=1.0, rl_weight=0.0, chunk_size=5))
    assert_close_all(got[:3], reference(hidden, weight, inputs, sampled_rkl_rows(teacher)))
    assert got[3].rl_loss == 0.0


@pytest.mark.parametrize("divergence", ["rkl_sampled", "jsd"])
def test_mixture_is_a_times_distill_plus_b_times_rl(divergence):
    hidden, weight, inputs, teacher = make_batch(seed=1)
    a, b = 0.3, 2.0
    mixed = run(
        hidden, weight, inputs, teacher, LossConfig(divergence=divergence, distill_weight=a, rl_weight=b, chunk_size=3)
    )
    distill = run(hidden, weight, inputs, teacher, LossConfig(divergence=divergence, chunk_size=7))
    rl = reference(hidden, weight, inputs, grpo_rows)
    assert_close_all(mixed[:3], [a * d + b * r for d, r in zip(distill[:3], rl, strict=True)])
    assert mixed[3].distill_loss == pytest.approx(distill[0].item())
    assert mixed[3].rl_loss == pytest.approx(rl[0].item())


def test_ppo_clip_uses_behaviour_logprobs_and_zeroes_clipped_gradients():
    hidden, weight, inputs, teacher = make_batch(seed=2, behaviour_noise=0.5)
    pg = {"importance": "ppo_clip", "clip_low": 0.1, "clip_high": 0.2}
    cfg = LossConfig(distill_weight=1.0, rl_weight=0.5, policy_gradient=pg, chunk_size=4)
    behaviour = inputs.behaviour_logprobs

    def rows(s, s_y):
        ratio = torch.exp(s_y - behaviour)
        total = 0
        for adv, coef in (((teacher.token_logprobs - s_y).detach(), 1.0), (grpo_advantage_rows(), 0.5)):
            total = total - coef * torch.minimum(ratio * adv, ratio.clamp(0.9, 1.2) * adv)
        return total

    ratio = torch.exp(
        torch.log_softmax(hidden @ weight.T, -1).gather(1, inputs.target_ids[:, None]).squeeze(1) - behaviour
    )
    assert ((ratio < 0.9) | (ratio > 1.2)).any() and ((ratio > 0.9) & (ratio < 1.2)).any()
    assert_close_all(run(hidden, weight, inputs, teacher, cfg)[:3], reference(hidden, weight, inputs, rows))


def test_ppo_clip_without_behaviour_logprobs_is_refused():
    hidden, weight, inputs, teacher = make_batch()
    cfg = LossConfig(policy_gradient={"importance": "ppo_clip"})
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        run(hidden, weight, inputs, teacher, cfg)


def test_rl_term_without_rewards_is_refused():
    hidden, weight, inputs, teacher = make_batch()
    inputs = LossInputs(inputs.target_ids, inputs.loss_weights, inputs.cu_seqlens)
    with pytest.raises(ValueError, match="inputs.rewards"):
        run(hidden, weight, inputs, teacher, LossConfig(rl_weight=1.0))


def test_discounted_sampled_advantage_sums_future_terms_within_each_sequence():
    hidden, weight, inputs, teacher = make_batch(seed=3)
    gamma = 0.8

    def rows(s, s_y):
        per_token = ((teacher.token_logprobs - s_y) * (inputs.loss_weights > 0)).detach().tolist()
        returns = [0.0] * N
        for start, end in zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist(), strict=True):
            for i in range(start, end):
                returns[i] = sum(gamma ** (j - i) * per_token[j] for j in range(i, end))
        return -torch.tensor(returns, dtype=torch.float64) * torch.exp(s_y - s_y.detach())

    got = run(hidden, weight, inputs, teacher, LossConfig(discount=gamma, chunk_size=6))
    assert_close_all(got[:3], reference(hidden, weight, inputs, rows))


# ----------------------------------------------------------------------------- sample weights and normalisation


def test_reward_softmax_and_pass_rate_scale_each_sequence_without_renormalising():
    """The named non-default forms: per-group softmax of raw rewards, raw PACED weights (the recipe's
    batch-wide binarised softmax and mean-1 PACED weights are the defaults: tests/unit/test_recipe_*.py)."""
    hidden, weight, inputs, teacher = make_batch(seed=4)
    cfg = LossConfig(
        reward_softmax={"enabled": True, "beta": 0.5, "form": "group_raw"},
        pass_rate={"enabled": True, "alpha": 1.0, "beta": 1.0, "floor": 0.1, "normalize": False},
        chunk_size=5,
    )
    softmax = torch.cat([torch.softmax(REWARDS[:2] / 0.5, 0) * 2, torch.softmax(REWARDS[2:] / 0.5, 0) * 2])
    pass_rate = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    frontier = (pass_rate * (1 - pass_rate)).clamp(min=0.1)
    row_weights = inputs.loss_weights * (softmax * frontier)[seq_of_rows()]
    want = reference(hidden, weight, inputs, sampled_rkl_rows(teacher), row_weights=row_weights)
    assert_close_all(run(hidden, weight, inputs, teacher, cfg)[:3], want)


def test_sequence_mean_averages_tokens_within_sequences_then_sequences():
    hidden, weight, inputs, teacher = make_batch(seed=5)
    seq = seq_of_rows()
    per_seq = torch.zeros(4, dtype=torch.float64).index_add_(0, seq, inputs.loss_weights)
    row_weights = inputs.loss_weights / (per_seq[seq] * 4)
    want = reference(hidden, weight, inputs, sampled_rkl_rows(teacher), row_weights=row_weights, denom=1.0)
    got = run(hidden, weight, inputs, teacher, LossConfig(normalization="sequence_mean", chunk_size=5))
    assert_close_all(got[:3], want)


# ----------------------------------------------------------------------------- TIP token selection


def tip_config(**selection) -> LossConfig:
    return LossConfig(divergence="rkl", token_selection={"enabled": True, **selection}, chunk_size=5)


def test_tip_keeps_rho_of_valid_tokens_and_equals_masking_the_others():
    hidden, weight, inputs, teacher = make_batch(seed=6)
    cfg = tip_config(keep_fraction=0.5, entropy_exponent=1.0, divergence_exponent=1.0, seed=3)
    plan = plan_rows(hidden, weight, None, inputs, teacher, cfg, 7, chunk_rows(V, cfg.chunk_size, 1))
    valid = inputs.loss_weights > 0
    assert int(plan.kept_N.sum()) == math.floor(0.5 * int(valid.sum()) + 0.5) and not (plan.kept_N & ~valid).any()
    got = run(hidden, weight, inputs, teacher, cfg, step=7)
    masked = LossInputs(inputs.target_ids, inputs.loss_weights * plan.kept_N, CU_SEQLENS, GROUP_IDS, REWARDS)
    want = run(hidden, weight, masked, teacher, LossConfig(divergence="rkl", chunk_size=5))
    assert_close_all(got[:3], want[:3])
    assert got[3].fraction_kept == pytest.approx(int(plan.kept_N.sum()) / int(valid.sum()))


def test_tip_draw_is_reproducible_per_step_and_changes_across_steps():
    hidden, weight, inputs, teacher = make_batch(seed=7)
    cfg = tip_config(keep_fraction=0.4, seed=1)
    kept = [plan_rows(hidden, weight, None, inputs, teacher, cfg, step, 5).kept_N for step in (0, 0, 1, 2, 3)]
    assert torch.equal(kept[0], kept[1])
    assert any(not torch.equal(kept[0], k) for k in kept[2:])


def test_tip_never_draws_near_zero_entropy_tokens_while_others_remain():
    hidden, weight, inputs, teacher = make_batch(seed=8)
    hidden = hidden.clone()
    confident = torch.tensor([0, 1, 3, 4, 5, 6, 7])  # 7 of the 13 valid rows become near one-hot
    hidden[confident] *= 60.0
    cfg = tip_config(keep_fraction=6 / 13, entropy_exponent=4.0)
    kept = plan_rows(hidden, weight, None, inputs, teacher, cfg, 0, 5).kept_N
    assert not kept[confident].any() and int(kept.sum()) == 6


def test_tip_divergence_weight_needs_a_teacher_distribution():
    hidden, weight, inputs, teacher = make_batch()
    teacher = TeacherTensors(teacher.token_logprobs)
    cfg = LossConfig(token_selection={"enabled": True, "divergence_exponent": 1.0})
    with pytest.raises(ValueError, match="divergence_exponent"):
        run(hidden, weight, inputs, teacher, cfg)


@pytest.mark.parametrize("jsd_support", ["topk", "full"])
def test_tip_scores_are_student_entropy_and_symmetric_jsd_over_the_chosen_support(jsd_support):
    hidden, weight, inputs, teacher = make_batch(seed=9)
    cfg = tip_config(divergence_exponent=1.0, jsd_support=jsd_support)
    valid = inputs.loss_weights > 0
    scores = prescore_rows(hidden, weight, None, inputs, teacher, cfg, valid, 5)
    s = torch.log_softmax(hidden @ weight.T, -1)
    if jsd_support == "topk":  # both sides restricted to the teacher's top-k and renormalised
        s_b = s.gather(1, teacher.topk_ids)
        s_b, t_b = (
            s_b - s_b.logsumexp(-1, keepdim=True),
            teacher.topk_logprobs - teacher.topk_logprobs.logsumexp(-1, keepdim=True),
        )
    else:
        s_b, t_b = s, teacher.full_logprobs
    log_m = ((s_b.exp() + t_b.exp()) / 2).log()
    jsd = 0.5 * (s_b.exp() * (s_b - log_m)).sum(-1) + 0.5 * (t_b.exp() * (t_b - log_m)).sum(-1)
    torch.testing.assert_close(scores.jsd_N[valid], jsd[valid], **TOL)
    torch.testing.assert_close(scores.entropy_N[valid], -(s.exp() * s).sum(-1)[valid], **TOL)
    assert (scores.jsd_N[valid] <= math.log(2)).all()
