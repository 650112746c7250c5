"""Recipe: GRPO with a KL penalty to a reference policy (verl's use_kl_loss), against float64 autograd.

The penalty is part of the RL term: L_rl = sum_i c_i (-A_i ratio_i + coef * kl_i) over the GRPO rows, kl_i an
estimate of KL(p_S || p_ref) from the sampled token (k1, k2, k3 = verl's kl, mse, low_var_kl). The reference is
autograd through log_softmax in float64 (same rows, same D), so rtol 1e-9 has orders of margin; a missing
or misplaced penalty moves the gradient by >= coef * O(1) of its scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.loss import divergences as dv
from student_trainer.loss.compute import LossInputs, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from tests.unit.test_losses_terms import CU_SEQLENS, GROUP_IDS, REWARDS, grpo_rows, make_batch, reference, run

pytestmark = pytest.mark.timeout(60)

TOL = dict(rtol=1e-9, atol=1e-11)


def estimate(logp, ref, estimator):
    d = ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return (torch.exp(d) - d - 1).clamp(max=10.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimates_and_their_gradients_match_autograd(estimator):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(50, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(50, generator=g, dtype=torch.float64) * 4
    value, grad = dv.kl_penalty(logp, ref, estimator)
    x = logp.clone().requires_grad_()
    want = estimate(x, ref, estimator)
    want.sum().backward()
    torch.testing.assert_close(value, want.detach(), **TOL)
    torch.testing.assert_close(grad, x.grad, **TOL)


def test_k3_is_clamped_at_ten_with_no_gradient_there_and_is_zero_at_the_reference():
    value, grad = dv.kl_penalty(torch.tensor([-20.0, -1.0]), torch.tensor([0.0, -1.0]), "k3")
    assert value.tolist() == [10.0, 0.0] and grad.tolist() == [0.0, 0.0]


def with_reference(inputs: LossInputs, ref: torch.Tensor) -> LossInputs:
    return LossInputs(inputs.target_ids, inputs.loss_weights, CU_SEQLENS, GROUP_IDS, REWARDS, reference_logprobs=ref)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_with_kl_is_the_grpo_term_plus_coef_times_the_kl_estimate(estimator):
    hidden, weight, inputs, teacher = make_batch(seed=3)
    g = torch.Generator().manual_seed(5)
    ref = torch.log_softmax(torch.randn(16, 23, generator=g, dtype=torch.float64), -1)
    ref_y = ref.gather(1, inputs.target_ids[:, None]).squeeze(1)
    inputs = with_reference(inputs, ref_y)
    coef = 0.3
    cfg = LossConfig(distill_weight=0.0, rl_weight=1.0, kl={"coef": coef, "estimator": estimator}, chunk_size=5)
    got = run(hidden, weight, inputs, teacher, cfg)
    want = reference(hidden, weight, inputs, lambda s, s_y: grpo_rows(s, s_y) + coef * estimate(s_y, ref_y, estimator))
    for a, b in zip(got[:3], want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    valid = inputs.loss_weights > 0
    s_y = torch.log_softmax(hidden @ weight.T, -1).gather(1, inputs.target_ids[:, None]).squeeze(1)
    assert got[3].reference_kl == pytest.approx(estimate(s_y, ref_y, estimator)[valid].mean().item(), rel=1e-9)


def test_the_penalty_of_a_policy_equal_to_its_reference_is_zero_with_k3():
    hidden, weight, inputs, teacher = make_batch(seed=1)
    own = torch.log_softmax(hidden @ weight.T, -1).gather(1, inputs.target_ids[:, None]).squeeze(1)
    cfg = LossConfig(distill_weight=0.0, rl_weight=1.0, kl={"coef": 1.0}, chunk_size=5)
    with_kl = run(hidden, weight, with_reference(inputs, own), teacher, cfg)
    without = run(
        hidden,
        weight,
        with_reference(inputs, own),
        teacher,
        LossConfig(distill_weight=0.0, rl_weight=1.0, chunk_size=5),
    )
    for a, b in zip(with_kl[:3], without[:3], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert with_kl[3].reference_kl == pytest.approx(0.0, abs=1e-12) and math.isnan(without[3].reference_kl)


def test_kl_without_reference_logprobs_or_without_the_rl_term_is_refused_clearly():
    hidden, weight, inputs, teacher = make_batch()
    cfg = LossConfig(distill_weight=0.0, rl_weight=1.0, kl={"coef": 0.1})
    with pytest.raises(ValueError, match="inputs.reference_logprobs"):
        compute_distillation_loss(hidden, weight, inputs, teacher, cfg, 0)
    with pytest.raises(ValueError, match="kl.coef=0.1 penalises the GRPO term, but rl_weight is 0"):
        LossConfig(kl={"coef": 0.1})
