"""Trainer scale on CUDA: the compiled block math against the float64 reference, and packed attention (per-sequence
SDPA and compiled flex_attention) against the same sequences one at a time. Skipped without CUDA.

Tolerances. The loss: float32 on the GPU vs the float64 reference, TOL32 of tests/unit/test_losses.py (the
same bound the eager CPU path meets). Attention: float32, unit roundoff u = 6e-8. Each per-token term passes
through two layers whose dot products (length 16) and softmax sums (<= 20 keys) round O(30) times, ~100 u per
term; a gradient element sums n <= 100 of them with independent rounding errors, ~sqrt(n) * 100 u ~ 6e-5 of
its scale. atol = 1e-4 x scale; a token attending across sequences moves its terms by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch

from student_trainer.loss.config import LossConfig
from tests.unit.test_losses import TOL32, VARIANTS, assert_matches, make_batch, reference_loss
from tests.unit.test_packed_attention import rollouts, run, step_terms, tiny_student

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
def compile_enabled(monkeypatch):
    """tests/conftest.py disables torch.compile for the CPU suite; these tests are about the compiled code."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", False)


def _on_cuda(batch):
    hidden, weight, bias, inputs, teacher = batch
    cuda = torch.device("cuda")
    moved = type(inputs)(**{k: None if v is None else v.to(cuda) for k, v in vars(inputs).items()})
    teacher = type(teacher)(**{k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in vars(teacher).items()})
    return hidden.float().to(cuda), weight.float().to(cuda), bias.float().to(cuda), moved, teacher


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_compiled_loss_on_cuda_matches_the_float64_reference(divergence, support):
    from student_trainer.loss.compute import compute_distillation_loss

    batch = make_batch(seed=5)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=5, compile="auto")
    hidden, weight, bias, inputs, teacher = _on_cuda(batch)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss, _ = compute_distillation_loss(h, w, inputs, teacher, cfg, 0, lm_head_bias_V=b)
    loss.backward()
    got = [t.detach().cpu() for t in (loss, h.grad, w.grad, b.grad)]
    assert_matches(got, reference_loss(*batch, cfg), **TOL32)


@pytest.mark.parametrize("path", ["sdpa", "flex"])
def test_packed_attention_on_cuda_equals_the_sequences_one_at_a_time(path):
    from student_trainer.batching import build_micro_batch

    # a float32 copy on the GPU; head_dim 16, the smallest flex_attention's kernels take
    model = copy.deepcopy(tiny_student("qwen2", head_dim=16)).float().cuda()
    groups, scores = rollouts()
    config = LossConfig(divergence="fkl", rl_weight=0.5, reward_softmax={"enabled": True}, chunk_size=7)
    sample_weights, advantages = step_terms(groups, config)
    kwargs = dict(sample_weights=sample_weights, advantages=advantages)
    cuda = torch.device("cuda")
    packed = [build_micro_batch(groups, {}, **kwargs).to(cuda)]
    singles = [build_micro_batch([[r]], {}, **kwargs).to(cuda) for g in groups for r in g]
    loss_packed, grads_packed = run(model, packed, scores, config, path)
    loss_single, grads_single = run(model, singles, scores, config, path)
    assert loss_packed == pytest.approx(loss_single, rel=1e-4)
    for name, grad in grads_packed.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grad, grads_single[name], rtol=0, atol=1e-4 * scale + 1e-12, msg=name)
