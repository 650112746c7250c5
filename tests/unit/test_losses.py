"""Specification of the chunked distillation losses against a plain reference.

The reference materialises the full float64 logits, writes each divergence as
its formula and lets autograd differentiate it. The chunked implementation
must agree in value and in gradient w.r.t. hidden states, lm-head weight and
bias, for every chunk size (including sizes that do not divide N), with
masks, fractional token weights and a student temperature.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.loss.compute import LossInputs, TeacherTensors, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from tests.fixtures.largest_tensor import LargestTensor

pytestmark = pytest.mark.timeout(120)

N, H, V, K = 13, 6, 29, 5
FLOOR = -100.0
TOL64 = dict(rtol=1e-9, atol=1e-11)  # float64 chunked vs float64 reference
TOL32 = dict(rtol=2e-4, atol=2e-6)  # float32 chunked vs float64 reference
VARIANTS = [("rkl_sampled", "topk")] + [(d, s) for d in ("fkl", "rkl", "jsd", "fkl_to_rkl") for s in ("topk", "full")]


# ----------------------------------------------------------------------------- fixtures


def make_batch(seed: int = 0, k: int = K, n: int = N, v: int = V, dtype=torch.float64):
    """Random student (hidden, weight, bias), teacher scores and inputs with masked rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=dtype)
    weight = torch.randn(v, H, generator=g, dtype=dtype) * 0.7
    bias = torch.randn(v, generator=g, dtype=dtype) * 0.1
    teacher_full = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5, -1)
    targets = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    weights[[i for i in (1, 4, 5) if i < n]] = 0.0  # masked rows (tool tokens)
    teacher = teacher_from_full(teacher_full, targets, k)
    cu_seqlens = torch.tensor([0, 4, 9, n]) if n >= 9 else torch.tensor([0, n])
    inputs = LossInputs(target_ids=targets, loss_weights=weights, cu_seqlens=cu_seqlens)
    return hidden, weight, bias, inputs, teacher


def teacher_from_full(full, targets, k: int) -> TeacherTensors:
    """What a teacher server sends: actual-token log-prob, top-k with the tail log-mass, full."""
    ids = full.topk(k, dim=-1).indices if k else torch.zeros(full.shape[0], 0, dtype=torch.long)
    topk = full.gather(1, ids)
    tail = full.masked_fill(torch.zeros_like(full, dtype=torch.bool).scatter(1, ids, True), -math.inf)
    return TeacherTensors(
        token_logprobs=full.gather(1, targets[:, None]).squeeze(1),
        topk_ids=ids.int(),
        topk_logprobs=topk,
        tail_logprobs=tail.logsumexp(-1),
        full_logprobs=full,
    )


# ----------------------------------------------------------------------------- reference


def reference_rows(logits, teacher: TeacherTensors, targets, cfg: LossConfig, reverse_weight: float = 0.0):
    """Per-row losses from full logits, written as the papers' formulas (autograd does the rest)."""
    z = logits / cfg.student_temperature
    s = torch.log_softmax(z, -1)
    if cfg.divergence == "rkl_sampled":
        s_y = s.gather(1, targets[:, None]).squeeze(1)
        advantage = (teacher.token_logprobs.double().clamp(min=FLOOR) - s_y).detach()
        return -advantage * torch.exp(s_y - s_y.detach())
    if cfg.support == "full":
        s_b, t_b = s, teacher.full_logprobs.double()
    else:
        ids = teacher.topk_ids.long()
        in_topk = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)
        s_tail = z.masked_fill(in_topk, -math.inf).logsumexp(-1) - z.logsumexp(-1)
        s_b = torch.cat([s.gather(1, ids), s_tail[:, None]], 1)
        t_b = torch.cat([teacher.topk_logprobs.double(), teacher.tail_logprobs.double()[:, None]], 1)
    s_b, t_b = s_b.clamp(min=FLOOR), t_b.clamp(min=FLOOR)
    p, q = s_b.exp(), t_b.exp()
    fkl = (q * (t_b - s_b)).sum(-1)
    rkl = (p * (s_b - t_b)).sum(-1)
    if cfg.divergence == "fkl":
        return fkl
    if cfg.divergence == "rkl":
        return rkl
    if cfg.divergence == "fkl_to_rkl":
        return (1 - reverse_weight) * fkl + reverse_weight * rkl
    beta = cfg.jsd_beta
    log_m = (beta * q + (1 - beta) * p).log()
    return beta * (q * (t_b - log_m)).sum(-1) + (1 - beta) * (p * (s_b - log_m)).sum(-1)


def reference_loss(hidden, weight, bias, inputs: LossInputs, teacher, cfg: LossConfig, reverse_weight: float = 0.0):
    """Token-mean loss and gradients (hidden, weight, bias) of the reference, float64:
    sum_i w_i l_i / #{i: w_i > 0} (token weights scale rows; the mean counts rows, so weights never cancel).

    reverse_weight 0: the default schedule is pure forward KL at step 0.
    """
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_()
    rows = reference_rows(h @ w.T + b, teacher, inputs.target_ids, cfg, reverse_weight)
    token_w = inputs.loss_weights.double()
    loss = (token_w * rows).sum() / (token_w > 0).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def chunked_loss(hidden, weight, bias, inputs, teacher, cfg, step: int = 0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    loss, stats = compute_distillation_loss(h, w, inputs, teacher, cfg, step, lm_head_bias_V=b)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad, stats


def assert_matches(got, want, **tol):
    for name, g, r in zip(("loss", "d hidden", "d weight", "d bias"), got, want, strict=False):
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_each_variant_equals_the_float64_reference_for_any_chunk_size(divergence, support, chunk_size):
    hidden, weight, bias, inputs, teacher = make_batch(seed=chunk_size)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=chunk_size, student_temperature=0.8)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_float32_inputs_match_the_float64_reference_within_float32_tolerance(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=3, dtype=torch.float32)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=6, jsd_beta=0.3)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    want = reference_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_matches(got[:4], want, **TOL32)


def test_bfloat16_parameters_get_bfloat16_gradients_close_to_float32():
    hidden, weight, bias, inputs, teacher = make_batch(seed=14, dtype=torch.float32)
    cfg = LossConfig(divergence="jsd", support="topk", chunk_size=4)
    want = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    got = chunked_loss(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), inputs, teacher, cfg)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got[1:4])
    for g, w in zip(got[:4], want[:4], strict=True):
        scale = w.abs().max().item()
        torch.testing.assert_close(g.float(), w, rtol=0.0, atol=0.05 * scale)


def test_fkl_to_rkl_blend_equals_the_weighted_mix_at_its_step():
    hidden, weight, bias, inputs, teacher = make_batch(seed=7)
    cfg = LossConfig(
        divergence="fkl_to_rkl", schedule={"mode": "linear", "blend_start_step": 10, "blend_end_step": 30}, chunk_size=4
    )
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg, step=15)
    assert got[4].reverse_kl_weight == pytest.approx(0.25)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg, reverse_weight=0.25), **TOL64)


def test_student_temperature_divides_the_logits():
    hidden, weight, bias, inputs, teacher = make_batch(seed=8)
    hot = LossConfig(divergence="rkl", support="full", student_temperature=2.0)
    cold = LossConfig(divergence="rkl", support="full", student_temperature=1.0)
    loss_hot = chunked_loss(hidden, weight, bias, inputs, teacher, hot)[0]
    loss_cold_half = chunked_loss(hidden / 2, weight, bias / 2, inputs, teacher, cold)[0]
    torch.testing.assert_close(loss_hot, loss_cold_half, **TOL64)


def test_teacher_temperature_mismatch_is_refused():
    hidden, weight, bias, inputs, teacher = make_batch()
    cfg = LossConfig(divergence="rkl", teacher_temperature=0.7)
    with pytest.raises(ValueError, match="teacher_temperature"):
        chunked_loss(hidden, weight, bias, inputs, teacher, cfg)


# ----------------------------------------------------------------------------- top-k forms


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "fkl_to_rkl"])
def test_topk_with_k_equal_to_vocab_equals_the_full_form(divergence):
    hidden, weight, bias, inputs, teacher = make_batch(seed=11, k=V)
    assert torch.isneginf(teacher.tail_logprobs).all()
    topk = chunked_loss(
        hidden, weight, bias, inputs, teacher, LossConfig(divergence=divergence, support="topk", chunk_size=5)
    )
    full = chunked_loss(
        hidden, weight, bias, inputs, teacher, LossConfig(divergence=divergence, support="full", chunk_size=5)
    )
    assert_matches(topk[:4], full[:4], **TOL64)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "fkl_to_rkl"])
def test_k_zero_refuses_topk_forms_with_a_clear_error(divergence):
    hidden, weight, bias, inputs, teacher = make_batch(k=0)
    with pytest.raises(ValueError, match=r"k=0.*top_k > 0"):
        chunked_loss(hidden, weight, bias, inputs, teacher, LossConfig(divergence=divergence, support="topk"))


def test_k_zero_is_enough_for_sampled_reverse_kl():
    hidden, weight, bias, inputs, teacher = make_batch(k=0)
    teacher = TeacherTensors(token_logprobs=teacher.token_logprobs)
    cfg = LossConfig(divergence="rkl_sampled", chunk_size=4)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)
    assert math.isnan(got[4].top1_agreement)


def test_full_support_without_full_logprobs_is_refused():
    hidden, weight, bias, inputs, teacher = make_batch()
    teacher = TeacherTensors(teacher.token_logprobs, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprobs)
    with pytest.raises(ValueError, match="full_logprobs"):
        chunked_loss(hidden, weight, bias, inputs, teacher, LossConfig(divergence="jsd", support="full"))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_empty_mask_gives_zero_loss_zero_gradients_and_nan_means(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch()
    inputs = LossInputs(inputs.target_ids, torch.zeros(N), inputs.cu_seqlens)
    loss, d_hidden, d_weight, d_bias, stats = chunked_loss(
        hidden, weight, bias, inputs, teacher, LossConfig(divergence=divergence, support=support)
    )
    assert loss.item() == 0.0
    assert not d_hidden.any() and not d_weight.any() and not d_bias.any()
    assert stats.num_tokens == 0 and math.isnan(stats.mean_divergence)


def test_empty_batch_gives_zero_loss():
    hidden, weight, bias, inputs, teacher = make_batch(n=0)
    loss, d_hidden, d_weight, _, stats = chunked_loss(
        hidden, weight, bias, inputs, teacher, LossConfig(divergence="rkl", support="topk")
    )
    assert loss.item() == 0.0 and d_hidden.shape == (0, H) and not d_weight.any()


def test_fully_masked_chunks_and_rows_get_zero_gradient():
    hidden, weight, bias, inputs, teacher = make_batch(seed=5)
    weights = inputs.loss_weights.clone()
    weights[:6] = 0.0  # the first chunk of 3 and the second chunk are fully masked
    inputs = LossInputs(inputs.target_ids, weights, inputs.cu_seqlens)
    cfg = LossConfig(divergence="jsd", support="topk", chunk_size=3)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert not got[1][:6].any()
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_minus_inf_teacher_logprobs_stay_finite_and_match_the_floored_reference(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=9)
    full = teacher.full_logprobs.clone()
    full[:, ::3] = -math.inf  # the teacher rules out a third of the vocabulary
    full = full - full.logsumexp(-1, keepdim=True)
    teacher = teacher_from_full(full, inputs.target_ids, K)
    topk = teacher.topk_logprobs.clone()
    topk[0, -1] = -math.inf  # and sends a -inf entry inside its top-k
    teacher = TeacherTensors(teacher.token_logprobs, teacher.topk_ids, topk, teacher.tail_logprobs, full)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=4)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert all(torch.isfinite(t).all() for t in got[:4])
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("tail", [-math.inf, math.log(1e-30)])
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_teacher_tail_mass_near_zero(divergence, tail):
    hidden, weight, bias, inputs, teacher = make_batch(seed=12)
    teacher = TeacherTensors(
        teacher.token_logprobs,
        teacher.topk_ids,
        teacher.topk_logprobs - teacher.topk_logprobs.logsumexp(-1, keepdim=True),
        torch.full((N,), tail, dtype=torch.float64),
    )
    cfg = LossConfig(divergence=divergence, support="topk", chunk_size=5)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert all(torch.isfinite(t).all() for t in got[:4])
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


def test_without_grad_the_loss_is_the_same_and_nothing_is_recorded():
    hidden, weight, bias, inputs, teacher = make_batch()
    cfg = LossConfig(divergence="jsd", support="topk", chunk_size=4)
    with torch.no_grad():
        loss, _ = compute_distillation_loss(hidden, weight, inputs, teacher, cfg, 0, lm_head_bias_V=bias)
    want = reference_loss(hidden, weight, bias, inputs, teacher, cfg)[0]
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want, **TOL64)


def test_bad_shapes_are_refused_naming_the_input():
    hidden, weight, bias, inputs, teacher = make_batch()
    bad = LossInputs(inputs.target_ids[:-1], inputs.loss_weights, inputs.cu_seqlens)
    with pytest.raises(ValueError, match="inputs.target_ids"):
        chunked_loss(hidden, weight, bias, bad, teacher, LossConfig())
    bad = LossInputs(inputs.target_ids, inputs.loss_weights, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="inputs.cu_seqlens"):
        chunked_loss(hidden, weight, bias, bad, teacher, LossConfig())


# ----------------------------------------------------------------------------- statistics


def test_statistics_are_the_means_over_kept_tokens():
    hidden, weight, bias, inputs, teacher = make_batch(seed=4)
    cfg = LossConfig(divergence="rkl", support="full", chunk_size=4)
    stats = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)[4]
    logits = hidden @ weight.T + bias
    s = torch.log_softmax(logits, -1)
    kept = inputs.loss_weights > 0
    entropy = -(s.exp() * s).sum(-1)[kept].mean()
    rkl = reference_rows(logits, teacher, inputs.target_ids, cfg)[kept].mean()
    agree = (logits.argmax(-1) == teacher.full_logprobs.argmax(-1))[kept].double().mean()
    assert stats.num_tokens == stats.num_kept_tokens == int(kept.sum()) and stats.fraction_kept == 1.0
    assert stats.student_entropy == pytest.approx(entropy.item(), rel=1e-9)
    assert stats.mean_divergence == pytest.approx(rkl.item(), rel=1e-9)
    assert stats.top1_agreement == pytest.approx(agree.item())
    assert stats.rl_loss == 0.0 and stats.loss == pytest.approx(stats.distill_loss)


# ----------------------------------------------------------------------------- memory bound


@pytest.mark.parametrize("divergence,support", [("rkl_sampled", "topk"), ("jsd", "topk"), ("rkl", "topk")])
def test_no_tensor_of_n_by_v_elements_exists_in_forward_or_backward(divergence, support):
    n, v, chunk = 64, 50, 4
    hidden, weight, bias, inputs, teacher = make_batch(seed=2, n=n, v=v)
    teacher = TeacherTensors(teacher.token_logprobs, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprobs)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=chunk)
    with LargestTensor() as probe:
        loss, _ = compute_distillation_loss(h, w, inputs, teacher, cfg, 0)
        loss.backward()
    assert probe.largest <= max(v * H, n * H, chunk * v) < n * v  # params, activations, one chunk


@pytest.mark.parametrize("divergence,support", VARIANTS[1:])
def test_student_logprobs_below_the_floor_get_no_gradient_and_match_the_reference(divergence, support):
    hidden, weight, bias, inputs, teacher = make_batch(seed=13)
    hidden = hidden * 40.0  # log-prob gaps well beyond 100 nats
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=4)
    logits = hidden @ weight.T + bias
    assert (torch.log_softmax(logits, -1) < FLOOR).any()
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


@pytest.mark.parametrize("divergence,support", VARIANTS)
def test_row_blocks_within_a_chunk_equal_the_reference(divergence, support):
    """block_budget_mib this small makes blocks of one row: the chunk's d logits are written back block by block."""
    hidden, weight, bias, inputs, teacher = make_batch(seed=21)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=5, block_budget_mib=1e-4)
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)
