"""Per-chunk divergence math shared by every loss variant.

Owns the formulas of the built-in divergences (their rows are in
`student_trainer.loss.registry`). A divergence over distributions is one
function over *bucket* log-probs, either the whole vocabulary (support
"full") or the teacher's top-k ids plus one tail bucket holding the rest of
the vocabulary (support "topk"), and returns the per-row value and its
derivative with respect to the student's bucket log-probs. A sampled-token
divergence returns a per-token value from the sampled token's log-probs only.
Chain-rule helpers turn bucket gradients, and sampled-token (policy-gradient)
gradients, into d loss / d logits for one chunk. So the full and top-k
forms, the schedule's blend and the RL term all share one set of formulas and
one chain rule.

Notation (rows C of a chunk, vocabulary V, buckets B): student logits
`z = logits / T_s`, student log-probs `s = log_softmax(z)`, `p = exp(s)`;
teacher log-probs `t` (taken as given: the teacher applied its own
temperature). Both sides are floored, `s^ = max(s, f)`, `t^ = max(t, f)` with
`f = LossConfig.logprob_floor` (default -100), so that -inf teacher log-probs
(probability 0) and an empty student tail keep every KL finite;
`q^ = exp(t^)`, and `p^ = exp(s^)`, for which the unfloored `p` stands in on the
full vocabulary (they differ by less than e^f). Gradients are taken through
the floor (zero where `s^ <= f`).

This module does not run the lm-head, loop over chunks, weight or reduce rows:
see `student_trainer.loss.fused_linear` and `student_trainer.loss.compute`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from student_trainer.loss.registry import DivergenceArgs

# (s^ [C, B], p^ [C, B], t [C, B] unfloored, args) -> (loss [C], d loss / d s^ [C, B]); inputs stay unmodified
BucketFn = Callable[[Tensor, Tensor, Tensor, DivergenceArgs], tuple[Tensor, Tensor]]


@dataclass
class StudentChunk:
    """Student distribution of one chunk (float32 or float64)."""

    logprobs_CV: Tensor  # s^ = max(log_softmax(logits / T_s), f)
    probs_CV: Tensor  # p = exp(log_softmax(logits / T_s)), before the floor


@dataclass
class Buckets:
    """Student and teacher log-probs over the buckets of one chunk."""

    student_CB: Tensor  # student bucket log-probs s^, floored
    student_probs_CB: Tensor  # exp of the student bucket log-probs (p^, up to e^f)
    teacher_CB: Tensor  # teacher bucket log-probs t, not yet floored (may be -inf)
    ids_CK: Tensor | None = None  # top-k ids (None for the full support)
    tail_probs_CV: Tensor | None = None  # p_j for j outside the top-k, 0 inside
    tail_mass_C: Tensor | None = None  # sum_j tail_probs_CV (unfloored)


def student_chunk(logits_CV: Tensor, temperature: float, floor: float, inplace: bool = True) -> StudentChunk:
    """Floored log_softmax of `logits_CV / temperature`, computed in place on `logits_CV` (eager: one buffer
    fewer) or out of place (`inplace=False`: under torch.compile, which fuses it and need not write back)."""
    if not inplace:
        z_CV = logits_CV / temperature if temperature != 1.0 else logits_CV
        logprobs_CV = z_CV - torch.logsumexp(z_CV, dim=-1, keepdim=True)
        return StudentChunk(logprobs_CV=logprobs_CV.clamp(min=floor), probs_CV=logprobs_CV.exp())
    if temperature != 1.0:
        logits_CV.div_(temperature)
    logits_CV.sub_(torch.logsumexp(logits_CV, dim=-1, keepdim=True))
    probs_CV = logits_CV.exp()
    return StudentChunk(logprobs_CV=logits_CV.clamp_(min=floor), probs_CV=probs_CV)


def entropy_rows(student: StudentChunk) -> Tensor:
    """Student entropy H(p_S) = -sum_v p_v s_v per row, [C] nats."""
    return -torch.einsum("cv,cv->c", student.probs_CV, student.logprobs_CV)


def full_buckets(student: StudentChunk, teacher_CV: Tensor) -> Buckets:
    """Buckets = the V vocabulary entries; `teacher_CV` holds full teacher log-probs."""
    return Buckets(student_CB=student.logprobs_CV, student_probs_CB=student.probs_CV, teacher_CB=teacher_CV)


def topk_buckets(
    student: StudentChunk, ids_CK: Tensor, teacher_CK: Tensor, teacher_tail_C: Tensor, floor: float
) -> Buckets:
    """Buckets = the teacher's k ids plus a tail bucket (everything else).

    Student tail log-mass is log sum_{j not in top-k} p_j, summed directly (no
    1 - sum cancellation); it is -inf (floored to f) when the top-k covers the
    vocabulary.
    """
    ids_CK = ids_CK.long()
    tail_probs_CV = student.probs_CV.scatter(1, ids_CK, 0.0)
    tail_mass_C = tail_probs_CV.sum(-1)
    student_CB = torch.cat([student.logprobs_CV.gather(1, ids_CK), tail_mass_C.log().clamp(min=floor)[:, None]], 1)
    teacher_CB = torch.cat([teacher_CK, teacher_tail_C[:, None]], dim=1).to(student_CB.dtype)
    return Buckets(
        student_CB=student_CB,
        student_probs_CB=student_CB.exp(),
        teacher_CB=teacher_CB,
        ids_CK=ids_CK,
        tail_probs_CV=tail_probs_CV,
        tail_mass_C=tail_mass_C,
    )


def renormalised_topk(student: StudentChunk, ids_CK: Tensor, teacher_CK: Tensor, floor: float) -> Buckets:
    """Both distributions restricted to the teacher's top-k ids and renormalised (TIP's d)."""
    student_CK = student.logprobs_CV.gather(1, ids_CK.long())
    student_CK = student_CK - torch.logsumexp(student_CK, -1, keepdim=True)
    teacher_CK = teacher_CK.to(student_CK.dtype).clamp(min=floor)
    return Buckets(
        student_CB=student_CK,
        student_probs_CB=student_CK.exp(),
        teacher_CB=teacher_CK - torch.logsumexp(teacher_CK, -1, keepdim=True),
    )


def sampled_reverse_kl(logp_C: Tensor, teacher_C: Tensor, args: DivergenceArgs) -> Tensor:
    """Sampled-token reverse KL, log p_S(y) - max(log p_T(y), f) per token [C].

    Its expectation under the student's sampling is KL(p_S || p_T); trained as
    a policy gradient with per-token reward log p_T(y) - log p_S(y), the
    on-policy distillation of Thinking Machines (2025) and MiniLLM.
    """
    return logp_C - teacher_C.to(logp_C.dtype).clamp(min=args.floor)


def forward_kl(s_hat: Tensor, p_hat: Tensor, t: Tensor, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """Forward KL(p_T || p_S) = sum_b q^_b (t^_b - s^_b); d/ds^ = -q^.

    The supervised-KD objective (Hinton et al. 2015); the "forward" stage of
    PACED's forward-then-reverse schedule (arXiv 2603.11178).
    """
    t_hat = t.to(s_hat.dtype).clamp(min=args.floor)
    q_hat = t_hat.exp()
    loss_C = torch.einsum("cb,cb->c", q_hat, t_hat.sub_(s_hat))
    return loss_C, q_hat.neg_()


def reverse_kl(s_hat: Tensor, p_hat: Tensor, t: Tensor, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """Reverse KL(p_S || p_T) = sum_b p^_b (s^_b - t^_b); d/ds^ = p^ (s^ - t^ + 1).

    Mode-seeking distillation objective of MiniLLM (Gu et al. 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models", ICLR 2024).
    """
    diff = t.to(s_hat.dtype).clamp(min=args.floor).neg_().add_(s_hat)
    loss_C = torch.einsum("cb,cb->c", p_hat, diff)
    return loss_C, diff.add_(1.0).mul_(p_hat)


def jsd(s_hat: Tensor, p_hat: Tensor, t: Tensor, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """Generalised JSD(beta) of GKD (Agarwal et al. 2024, "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes", ICLR 2024):

        M = beta p_T + (1 - beta) p_S
        JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
        d JSD_beta / d s^ = (1 - beta) p^ (s^ - log M)

    (the terms through M cancel because sum_b dM_b / ds^_b weights sum to M), beta = `args.jsd_beta`.
    """
    beta = args.jsd_beta
    shifted_t = t.to(s_hat.dtype).clamp(min=args.floor).add_(math.log(beta))  # t^ + log beta
    log_m = torch.logaddexp(shifted_t, s_hat + math.log1p(-beta))
    q_hat = shifted_t.exp().div_(beta)
    loss_C = beta * torch.einsum("cb,cb->c", q_hat, shifted_t.sub_(log_m).sub_(math.log(beta)))
    del q_hat, shifted_t
    student_term = log_m.neg_().add_(s_hat)  # s^ - log M
    loss_C += (1.0 - beta) * torch.einsum("cb,cb->c", p_hat, student_term)
    return loss_C, student_term.mul_(p_hat).mul_(1.0 - beta)


def forward_then_reverse_kl(s_hat: Tensor, p_hat: Tensor, t: Tensor, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """(1 - w) forward KL + w reverse KL, w = `args.reverse_weight` (PACED's schedule, arXiv 2603.11178)."""
    loss_f, grad_f = forward_kl(s_hat, p_hat, t, args)
    loss_r, grad_r = reverse_kl(s_hat, p_hat, t, args)
    return torch.lerp(loss_f, loss_r, args.reverse_weight), torch.lerp(grad_f, grad_r, args.reverse_weight)


def bucket_divergence(buckets: Buckets, fn: BucketFn, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """Per-row divergence [C] and its gradient d/ds [C, B] of `fn` on `buckets`, with the floor's
    gradient mask applied (zero where the student's bucket log-prob is at the floor)."""
    loss_C, grad_CB = fn(buckets.student_CB, buckets.student_probs_CB, buckets.teacher_CB, args)
    return loss_C, grad_CB.masked_fill_(buckets.student_CB <= args.floor, 0.0)


def policy_gradient_rows(
    logp_C: Tensor,
    advantage_C: Tensor,
    behaviour_C: Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled-token surrogate loss [C] and its gradient d/dlogp [C].

    Without behaviour log-probs (on-policy): loss = -A * exp(logp - sg(logp)),
    value -A, gradient -A (REINFORCE / score function).
    With them, PPO's clipped surrogate (Schulman et al. 2017), as GRPO uses it
    (Shao et al. 2024, DeepSeekMath):
        r = exp(logp - logp_behaviour)
        loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
    gradient -A r where the unclipped branch is the minimum, else 0.
    `dual_clip` c (verl's clip_ratio_c, Ye et al. 2020): where A < 0 the loss
    is further capped at -c A (gradient 0 there), as verl's
    `compute_policy_loss`. The advantage is treated as a constant (detached).
    """
    advantage_C = advantage_C.to(logp_C.dtype)
    if behaviour_C is None:
        return -advantage_C, -advantage_C
    ratio_C = (logp_C - behaviour_C.to(logp_C.dtype)).exp()
    unclipped_C = ratio_C * advantage_C
    clipped_C = ratio_C.clamp(1.0 - clip_low, 1.0 + clip_high) * advantage_C
    loss_C = -torch.minimum(unclipped_C, clipped_C)
    grad_C = torch.where(unclipped_C <= clipped_C, -unclipped_C, torch.zeros_like(unclipped_C))
    if dual_clip is not None:
        capped_C = (advantage_C < 0) & (loss_C > -dual_clip * advantage_C)
        loss_C = torch.where(capped_C, -dual_clip * advantage_C, loss_C)
        grad_C = torch.where(capped_C, torch.zeros_like(grad_C), grad_C)
    return loss_C, grad_C


KL_CLAMP = 10.0  # k3 is clamped to [-10, 10] as verl's low_var_kl does


def kl_penalty(logp_C: Tensor, reference_C: Tensor, estimator: str) -> tuple[Tensor, Tensor]:
    """Per-token estimate [C] of KL(p_S || p_ref) from the sampled token y, and its gradient d/dlogp [C].

    With d = log p_ref(y) - log p_S(y) (Schulman 2020, "Approximating KL divergence"; verl's `kl_penalty`):
      k1 = -d                          d/dlogp = 1           (unbiased, high variance; verl 'kl')
      k2 = d^2 / 2                     d/dlogp = -d          (verl 'mse')
      k3 = exp(d) - d - 1, <= 10       d/dlogp = 1 - exp(d)  (unbiased, >= 0, low variance; verl 'low_var_kl',
                                                              0 gradient where the clamp bites)
    `reference_C` is the frozen reference policy's log-prob of y (a constant).
    """
    d_C = reference_C.to(logp_C.dtype) - logp_C
    if estimator == "k1":
        return -d_C, torch.ones_like(d_C)
    if estimator == "k2":
        return 0.5 * d_C.square(), -d_C
    ratio_C = d_C.exp()
    value_C = ratio_C - d_C - 1.0
    grad_C = torch.where(value_C <= KL_CLAMP, 1.0 - ratio_C, torch.zeros_like(ratio_C))
    return value_C.clamp(min=-KL_CLAMP, max=KL_CLAMP), grad_C


def logits_grad(
    student: StudentChunk,
    buckets: Buckets | None,
    bucket_grad_CB: Tensor | None,
    target_C: Tensor,
    sampled_grad_C: Tensor | None,
    temperature: float,
) -> Tensor:
    """d loss / d logits [C, V] from bucket and sampled-token gradients.

    With g = d loss / d s over the buckets and the log-softmax Jacobian
    ds_i/dz_j = delta_ij - p_j:
      full support:  dz_j = g_j - p_j sum_b g_b
      top-k support: dz_j = g_k (j = id_k) or g_tail p_j / p_tail (j outside) - p_j sum_b g_b
      sampled token y with gradient g_y: dz_j += g_y (delta_jy - p_j)
    then d/dlogits = dz / T_s. Inputs `bucket_grad_CB` may be overwritten.
    """
    probs_CV = student.probs_CV
    total_C = torch.zeros_like(probs_CV[:, 0])
    if buckets is None:
        dz_CV = torch.zeros_like(probs_CV)
    else:
        assert bucket_grad_CB is not None, "buckets come with their gradient"
        total_C += bucket_grad_CB.sum(-1)
        if buckets.ids_CK is None:
            dz_CV = bucket_grad_CB
        else:
            tail_mass_C, tail_probs_CV = buckets.tail_mass_C, buckets.tail_probs_CV
            assert tail_mass_C is not None and tail_probs_CV is not None, "top-k buckets carry their tail"
            tail_scale_C = torch.where(tail_mass_C > 0, bucket_grad_CB[:, -1] / tail_mass_C, 0.0)
            dz_CV = tail_probs_CV.mul_(tail_scale_C[:, None])
            dz_CV.scatter_add_(1, buckets.ids_CK, bucket_grad_CB[:, :-1])
    if sampled_grad_C is not None:
        total_C += sampled_grad_C
        dz_CV.scatter_add_(1, target_C.long()[:, None], sampled_grad_C[:, None])
    dz_CV.addcmul_(probs_CV, total_C[:, None], value=-1.0)
    if temperature != 1.0:
        dz_CV.div_(temperature)
    return dz_CV
