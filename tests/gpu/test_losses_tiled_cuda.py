"""The tiled lm-head pass (`loss.chunking=tiles`) on CUDA against the float64 reference. Skipped without CUDA.

float32: TOL32 of tests/unit/test_losses.py, the bound the CPU path meets. bfloat16: on CUDA the matmuls take
bf16 operands and return float32 (`torch.mm(..., out_dtype=float32)`), so the logits are float32 sums of exact
products; d logits is computed in float32 and rounded to bf16 (relative u = 2^-8) as a matmul operand, and each
gradient is rounded to bf16 once at the end. To first order, elementwise:
    |d hidden - ref| <= u (|dz| @ |W|) + u |ref| + tol32,   |d weight - ref| <= u (|dz|^T @ |h|) + u |ref| + tol32,
with dz the reference d loss / d logits; the loss and d bias (float32 sums of float32 dz) get u |ref| + tol32.
"""

from __future__ import annotations

import pytest
import torch

from student_trainer.loss import tiled
from student_trainer.loss.compute import compute_distillation_loss
from student_trainer.loss.config import LossConfig
from tests.unit.test_losses import TOL32, VARIANTS, assert_matches, make_batch, reference_rows

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

U = 2.0**-8
SHAPE = dict(n=300, v=5003)  # 3 tiles of 2048 (the last 907 wide), 2 row blocks of 256


def _cuda_batch(seed: int, dtype):
    hidden, weight, bias, inputs, teacher = make_batch(seed=seed, **SHAPE)
    cuda = torch.device("cuda")
    inputs = type(inputs)(**{k: None if v is None else v.to(cuda) for k, v in vars(inputs).items()})
    teacher = type(teacher)(**{k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in vars(teacher).items()})
    return hidden.to(cuda, dtype), weight.to(cuda, dtype), bias.to(cuda, dtype), inputs, teacher


def _reference(hidden, weight, bias, inputs, teacher, cfg):
    """float64 loss, gradients and d loss / d logits, from the given (rounded) parameters."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    logits = (h @ w.T + b).detach().requires_grad_()
    rows = reference_rows(logits, teacher, inputs.target_ids, cfg)
    token_w = inputs.loss_weights.double()
    loss = (token_w * rows).sum() / (token_w > 0).sum()
    loss.backward()
    dz = logits.grad
    return loss.detach(), dz @ w.detach(), dz.T @ h.detach(), dz.sum(0), dz


def _tiled_run(hidden, weight, bias, inputs, teacher, cfg):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss, _ = compute_distillation_loss(h, w, inputs, teacher, cfg, 0, lm_head_bias_V=b)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _config(divergence, support):
    return LossConfig(
        divergence=divergence, support=support, chunking="tiles", tile_vocab=2048, tile_budget_mib=2.0
    )  # 256 rows


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_tiled_float32_on_cuda_matches_the_float64_reference(divergence, support):
    batch = _cuda_batch(5, torch.float32)
    cfg = _config(divergence, support)
    got = [t.cpu() for t in _tiled_run(*batch, cfg)]
    want = [t.cpu() for t in _reference(*batch, cfg)[:4]]
    assert_matches(got, want, **TOL32)


@pytest.mark.parametrize("divergence,support", [("rkl", "full"), ("jsd", "topk"), ("rkl_sampled", "topk")])
def test_tiled_bfloat16_on_cuda_is_within_the_bf16_rounding_bound(divergence, support):
    batch = _cuda_batch(6, torch.bfloat16)
    hidden, weight = batch[0], batch[1]
    cfg = _config(divergence, support)
    got = _tiled_run(*batch, cfg)
    assert tiled._Matmul.out_dtype_ok, "torch.mm(..., out_dtype=torch.float32) is missing: logits would be bf16"
    loss, d_hidden, d_weight, d_bias, dz = _reference(*batch, cfg)
    tol32 = lambda ref: TOL32["rtol"] * ref.abs() + TOL32["atol"]  # noqa: E731
    bounds = [
        U * loss.abs() + tol32(loss),
        U * (dz.abs() @ weight.double().abs()) + U * d_hidden.abs() + tol32(d_hidden),
        U * (dz.abs().T @ hidden.double().abs()) + U * d_weight.abs() + tol32(d_weight),
        U * d_bias.abs() + tol32(d_bias),
    ]
    for name, g, ref, bound in zip(
        ("loss", "d hidden", "d weight", "d bias"), got, (loss, d_hidden, d_weight, d_bias), bounds, strict=True
    ):
        excess = ((g.double() - ref).abs() - bound).max().item()
        assert excess <= 0.0, f"{name}: error exceeds the bf16 bound by {excess:.3e}"
