"""Specification of the tiled lm-head pass (`loss.chunking=tiles`) against the float64 reference.

Every divergence and support, with a student temperature, masked rows and
fractional token weights, for tile shapes that do and do not divide N and V,
in float64 (TOL64), float32 (TOL32) and bfloat16 parameters. The weighting
and RL terms (GRPO, PPO clip, KL penalty, discount, TIP, reward softmax,
pass rate, sequence mean) are checked against the rows schedule, which
test_losses_terms.py holds to its own float64 references.

bfloat16 tolerance: on CPU the tiled pass multiplies float32 copies of the
bf16 values (exact) and does all of its math in float32, so the result
before the last step is within TOL32 of the reference; the gradients are
then rounded once to bf16, relative error at most u = 2^-8 (8 significant
bits, round to nearest). Hence |got - ref| <= u (|ref| + tol32) + tol32,
i.e. rtol = u + rtol32 (+ u rtol32, absorbed) and atol = atol32 (1 + u).
"""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.loss.compute import LossInputs, TeacherTensors, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.registry import DIVERGENCES, Divergence
from tests.fixtures.largest_tensor import LargestTensor
from tests.unit import test_losses_terms as terms
from tests.unit.test_losses import (
    FLOOR,
    TOL32,
    TOL64,
    VARIANTS,
    assert_matches,
    chunked_loss,
    make_batch,
    reference_loss,
    teacher_from_full,
)

pytestmark = pytest.mark.timeout(120)

BF16_U = 2.0**-8
TOL_BF16 = dict(rtol=BF16_U + TOL32["rtol"], atol=TOL32["atol"] * (1 + BF16_U))
# (tile_vocab, tile_budget_mib): N = 13 rows, V = 29: 7-wide tiles (last one 1 wide) of 4 rows (last one 1),
# one tile of all rows, and 1-wide tiles of one row.
SHAPES = [(7, 4 * 7 * 4 / 2**20), (29, 1.0), (1, 4 / 2**20)]


def tiled(divergence: str, support: str, shape=SHAPES[0], **kw) -> LossConfig:
    return LossConfig(
        divergence=divergence, support=support, chunking="tiles", tile_vocab=shape[0], tile_budget_mib=shape[1], **kw
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_each_variant_equals_the_float64_reference_for_any_tile_shape(divergence, support, shape):
    hidden, weight, bias, inputs, teacher = make_batch(seed=31)
    cfg = tiled(divergence, support, shape, student_temperature=0.8)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_float32_inputs_match_the_float64_reference_within_float32_tolerance(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=3, dtype=torch.float32)
    cfg = tiled(divergence, support, jsd_beta=0.3, student_temperature=1.3)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL32)


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_bfloat16_parameters_match_the_reference_within_one_bf16_rounding(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=14, dtype=torch.float32)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    cfg = tiled(divergence, support, student_temperature=0.9)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got[1:4])
    want = reference_loss(hidden.double(), weight.double(), bias.double(), inputs, teacher, cfg)
    assert_matches(got[:4], want, **TOL_BF16)


def test_fkl_to_rkl_blend_at_its_step():
    hidden, weight, bias, inputs, teacher = make_batch(seed=7)
    schedule = {"mode": "linear", "blend_start_step": 10, "blend_end_step": 30}
    for support in ("topk", "full"):
        cfg = tiled("fkl_to_rkl", support, schedule=schedule)
        got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg, step=15)
        want = reference_loss(hidden, weight, bias, inputs, teacher, cfg, reverse_weight=0.25)
        assert_matches(got[:4], want, **TOL64)


@pytest.mark.parametrize("divergence,support", VARIANTS[1:])  # the reference's sampled form has no floor
def test_minus_inf_teacher_logprobs_and_a_floored_student_match_the_reference(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=9)
    full = teacher.full_logprobs.clone()
    full[:, ::3] = -math.inf
    full = full - full.logsumexp(-1, keepdim=True)
    teacher = teacher_from_full(full, inputs.target_ids, 5)
    hidden = hidden * 40.0  # student log-prob gaps well beyond the floor
    assert (torch.log_softmax(hidden @ weight.T + bias, -1) < FLOOR).any()
    cfg = tiled(divergence, support)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert all(torch.isfinite(t).all() for t in got[:4])
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("tail", [-math.inf, math.log(1e-30)])
def test_teacher_tail_mass_near_zero_and_k_equal_to_vocab(tail):
    hidden, weight, bias, inputs, teacher = make_batch(seed=12)
    n = hidden.shape[0]
    teacher = TeacherTensors(
        teacher.token_logprobs,
        teacher.topk_ids,
        teacher.topk_logprobs - teacher.topk_logprobs.logsumexp(-1, keepdim=True),
        torch.full((n,), tail, dtype=torch.float64),
    )
    cfg = tiled("jsd", "topk")
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)
    hidden, weight, bias, inputs, teacher = make_batch(seed=11, k=weight.shape[0])  # the top-k is everything
    topk = chunked_loss(hidden, weight, bias, inputs, teacher, tiled("rkl", "topk"))
    assert_matches(topk[:4], chunked_loss(hidden, weight, bias, inputs, teacher, tiled("rkl", "full"))[:4], **TOL64)


def test_empty_mask_and_empty_batch_give_zero_loss_and_gradients():
    hidden, weight, bias, inputs, teacher = make_batch()
    inputs = LossInputs(inputs.target_ids, torch.zeros(hidden.shape[0]), inputs.cu_seqlens)
    loss, d_hidden, d_weight, d_bias, stats = chunked_loss(hidden, weight, bias, inputs, teacher, tiled("rkl", "full"))
    assert loss.item() == 0.0 and not d_hidden.any() and not d_weight.any() and not d_bias.any()
    assert stats.num_tokens == 0 and math.isnan(stats.mean_divergence)
    hidden, weight, bias, inputs, teacher = make_batch(n=0)
    loss, d_hidden, d_weight, _, _ = chunked_loss(hidden, weight, bias, inputs, teacher, tiled("jsd", "topk"))
    assert loss.item() == 0.0 and d_hidden.shape == (0, hidden.shape[1]) and not d_weight.any()


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_statistics_and_the_no_grad_loss_equal_the_rows_schedule(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=4)
    rows_cfg = LossConfig(divergence=divergence, support=support, chunk_size=4)
    want = chunked_loss(hidden, weight, bias, inputs, teacher, rows_cfg)[4]
    got = chunked_loss(hidden, weight, bias, inputs, teacher, tiled(divergence, support))[4]
    for name, value in vars(want).items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), name
    with torch.no_grad():
        loss, _ = compute_distillation_loss(hidden, weight, inputs, teacher, tiled(divergence, support), 0, bias)
    assert not loss.requires_grad and loss.item() == pytest.approx(want.loss, rel=1e-9, abs=1e-12)


RL_CONFIGS = [
    dict(distill_weight=0.5, rl_weight=1.0),
    dict(divergence="rkl_sampled", distill_weight=0.3, rl_weight=1.0, policy_gradient={"importance": "ppo_clip"}),
    dict(rl_weight=1.0, kl={"coef": 0.3, "estimator": "k3"}),
    dict(divergence="rkl_sampled", discount=0.9),
    dict(token_selection={"enabled": True, "keep_fraction": 0.5, "divergence_exponent": 1.0}),
    dict(reward_softmax={"enabled": True}, pass_rate={"enabled": True, "floor": 0.1}, normalization="sequence_mean"),
]


@pytest.mark.parametrize("settings", RL_CONFIGS, ids=lambda s: ",".join(s))
def test_weighting_and_rl_terms_equal_the_rows_schedule(settings):
    hidden, weight, inputs, teacher = terms.make_batch(seed=5, behaviour_noise=0.3)
    g = torch.Generator().manual_seed(1)
    reference = inputs.target_ids.double() * 0 - 3.0 + torch.randn(inputs.target_ids.shape, generator=g).double()
    inputs = LossInputs(**{**vars(inputs), "reference_logprobs": reference})
    settings = {"divergence": "jsd", "support": "topk", **settings}
    want = terms.run(hidden, weight, inputs, teacher, LossConfig(**settings, chunk_size=3), step=2)
    got = terms.run(hidden, weight, inputs, teacher, LossConfig(**settings, chunking="tiles", tile_vocab=5), step=2)
    assert_matches(got[:3], want[:3], **TOL64)
    assert got[3].rl_loss == pytest.approx(want[3].rl_loss, rel=1e-9, abs=1e-12)
    assert got[3].reference_kl == pytest.approx(want[3].reference_kl, rel=1e-9, nan_ok=True)


@pytest.mark.parametrize("divergence,support", [("rkl", "full"), ("jsd", "topk"), ("rkl_sampled", "topk")])
def test_no_tensor_larger_than_a_tile_exists_in_forward_or_backward(divergence, support):
    n, v, h = 64, 50, 6
    hidden, weight, bias, inputs, teacher = make_batch(seed=2, n=n, v=v)
    h_, w_ = hidden.requires_grad_(), weight.requires_grad_()
    cfg = tiled(divergence, support, (8, 16 * 8 * 4 / 2**20))  # tiles of 16 rows x 8 entries
    with LargestTensor() as probe:
        loss, _ = compute_distillation_loss(h_, w_, inputs, teacher, cfg, 0)
        loss.backward()
    # params, activations, one tile, and an [N, tile] view (no allocation) of the teacher's full log-probs
    assert probe.largest <= max(v * h, n * h, 16 * 8, n * 8) < n * v


def test_a_divergence_that_is_not_a_sum_over_buckets_is_refused_for_full_tiles(monkeypatch):
    monkeypatch.setitem(DIVERGENCES, "whole", Divergence(DIVERGENCES["rkl"].fn, DIVERGENCES["rkl"].needs, False, False))
    with pytest.raises(ValueError, match="chunking='rows'"):
        LossConfig(divergence="whole", support="full", chunking="tiles")
    LossConfig(divergence="whole", support="topk", chunking="tiles")  # the top-k form evaluates it once per row
