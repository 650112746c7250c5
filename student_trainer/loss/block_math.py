"""The math of one block of lm-head rows: student log-softmax, divergence, RL term and d loss / d logits.

Owns `BlockSettings` (the static part of a `LossConfig` the math reads,
hashable), `BlockRows` (the per-row inputs of one block), `block_terms` (a
pure function of one block's logits and rows: the per-row terms, statistics
and d logits, by the formulas of `student_trainer.loss.divergences` and the
divergence the registry names) and `block_function`, which hands out
`block_terms` eager or `torch.compile`d. Compiling fuses the dozen passes over
a `[rows, V]` block into a few kernels (no temporaries of that size between
them); the eager function is the reference every test compares against and
the fallback when compiling fails. It does not loop over chunks or rows, run
the lm-head, weight rows or keep statistics: `student_trainer.loss.compute`
does.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from student_trainer.loss import divergences as dv
from student_trainer.loss.config import LossConfig
from student_trainer.loss.registry import DivergenceArgs, divergence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockSettings:
    """What the block math reads from the config (one compiled function per distinct value)."""

    divergence: str
    support: str
    temperature: float
    floor: float
    jsd_beta: float
    importance: str
    clip_low: float
    clip_high: float
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    dual_clip: float | None = None  # the GRPO term's only

    @classmethod
    def of(cls, config: LossConfig) -> BlockSettings:
        pg = config.policy_gradient
        return cls(
            config.divergence,
            config.support,
            config.student_temperature,
            config.logprob_floor,
            config.jsd_beta,
            pg.importance,
            pg.clip_low,
            pg.clip_high,
            config.kl.coef,
            config.kl.estimator,
            pg.dual_clip,
        )


@dataclass
class BlockRows:
    """Per-row inputs of one block of C rows (None where absent)."""

    target_C: Tensor
    distill_scale_C: Tensor  # a * c_i of the distillation term
    rl_scale_C: Tensor  # b * c_i of the RL term
    teacher_token_C: Tensor  # teacher log-prob of the sampled token
    topk_ids_CK: Tensor | None
    topk_logprobs_CK: Tensor | None
    tail_C: Tensor | None
    full_CV: Tensor | None
    distill_advantage_C: Tensor | None  # discounted sampled-token advantage
    rl_advantage_C: Tensor | None  # GRPO advantage (None: no RL term)
    behaviour_C: Tensor | None  # behaviour log-probs when the importance ratio is on
    reference_C: Tensor | None = None  # reference policy's log-prob of the target (KL penalty)

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)

    @classmethod
    def of(cls, tensors: Iterable[Tensor | None]) -> BlockRows:
        """The inverse of `tensors()`: the fields in their order (which the type checker cannot follow)."""
        fields: list[Any] = list(tensors)
        return cls(*fields)


class BlockTerms(NamedTuple):
    distill_C: Tensor  # the distillation term per row (surrogate value for sampled divergences)
    rl_C: Tensor  # the RL surrogate per row (0 without an RL term)
    divergence_C: Tensor  # the divergence per row (statistics)
    entropy_C: Tensor  # student entropy, nats
    agree_C: Tensor  # 1 where argmax p_S == argmax p_T, nan if the teacher sent no distribution
    dlogits_CV: Tensor | None  # d (sum_i distill_scale_i distill_i + rl_scale_i rl_i) / d logits
    kl_C: Tensor  # the KL penalty's estimate of KL(p_S || p_ref) per row (0 without one; part of rl_C)


def block_terms(
    settings: BlockSettings,
    divergence_fn,
    sampled: bool,
    inplace: bool,
    logits_CV: Tensor,
    reverse_weight: float,
    need_grad: bool,
    *row_tensors: Any,
) -> BlockTerms:
    """Terms and d logits of one block. With `inplace`, `logits_CV` (compute dtype) is overwritten with the
    student's floored log-probs (eager: one buffer fewer); the compiled function leaves it alone (inductor
    fuses the math, and writing back would cost a buffer). `row_tensors` are `BlockRows.tensors()` (flat, so
    that the compiled function takes plain tensors; typed `Any` since their order carries their types)."""
    rows = BlockRows(*row_tensors)
    args = DivergenceArgs(settings.floor, settings.jsd_beta, reverse_weight)
    student = dv.student_chunk(logits_CV, settings.temperature, settings.floor, inplace)
    entropy_C = dv.entropy_rows(student)
    agree_C = top1_agreement(student.logprobs_CV.argmax(-1), rows, student.logprobs_CV.dtype)
    logp_C = student.logprobs_CV.gather(1, rows.target_C.long()[:, None]).squeeze(1)
    bucket_grad_CB, buckets = None, None
    token = token_terms(settings, divergence_fn, sampled, logp_C, rows, args, need_grad)
    if sampled:
        distill_C, divergence_C = token.distill_C, token.divergence_C
        assert distill_C is not None and divergence_C is not None, "a sampled divergence has its token terms"
    else:
        buckets = _buckets(student, rows, settings)
        distill_C, bucket_grad_CB = dv.bucket_divergence(buckets, divergence_fn, args)
        divergence_C = distill_C
    if not need_grad:
        return BlockTerms(distill_C, token.rl_C, divergence_C, entropy_C, agree_C, None, token.kl_C)
    if bucket_grad_CB is not None:  # every term's gradient is linear in its row scale: scale first, chain once
        bucket_grad_CB = bucket_grad_CB.mul_(rows.distill_scale_C[:, None])
    dlogits_CV = dv.logits_grad(student, buckets, bucket_grad_CB, rows.target_C, token.grad_C, settings.temperature)
    return BlockTerms(distill_C, token.rl_C, divergence_C, entropy_C, agree_C, dlogits_CV, token.kl_C)


class TokenTerms(NamedTuple):
    """The terms of a block that read only the sampled token's log-prob (sampled divergence, GRPO, KL)."""

    distill_C: Tensor | None  # the sampled divergence's surrogate (None for a divergence over buckets)
    divergence_C: Tensor | None  # the sampled divergence per row (None for a divergence over buckets)
    rl_C: Tensor  # the RL surrogate per row, its KL penalty included (0 without an RL term)
    kl_C: Tensor  # the KL penalty's estimate (0 without one)
    grad_C: Tensor | None  # d (distill_scale * sampled + rl_scale * rl) / d logp, None if none or not wanted


def token_terms(
    settings: BlockSettings,
    divergence_fn,
    sampled: bool,
    logp_C: Tensor,
    rows: BlockRows,
    args: DivergenceArgs,
    need_grad: bool,
) -> TokenTerms:
    """Sampled-token divergence (policy gradient), GRPO term and its KL penalty, from logp_C = s^(y) [C]."""
    behaviour_C = rows.behaviour_C if settings.importance != "none" else None
    distill_C, divergence_C, grad_C = None, None, None
    if sampled:
        divergence_C = divergence_fn(logp_C, rows.teacher_token_C, args)
        advantage_C = -divergence_C if rows.distill_advantage_C is None else rows.distill_advantage_C
        distill_C, sampled_grad_C = dv.policy_gradient_rows(
            logp_C, advantage_C.detach(), behaviour_C, settings.clip_low, settings.clip_high
        )
        grad_C = sampled_grad_C * rows.distill_scale_C
    rl_C, kl_C = torch.zeros_like(logp_C), torch.zeros_like(logp_C)
    if rows.rl_advantage_C is not None:
        rl_C, rl_grad_C = dv.policy_gradient_rows(
            logp_C, rows.rl_advantage_C, behaviour_C, settings.clip_low, settings.clip_high, settings.dual_clip
        )
        if rows.reference_C is not None and settings.kl_coef > 0:  # GRPO's KL penalty, part of the RL term
            kl_C, kl_grad_C = dv.kl_penalty(logp_C, rows.reference_C, settings.kl_estimator)
            rl_C = rl_C + settings.kl_coef * kl_C
            rl_grad_C = rl_grad_C + settings.kl_coef * kl_grad_C
        rl_grad_C = rl_grad_C * rows.rl_scale_C
        grad_C = rl_grad_C if grad_C is None else grad_C + rl_grad_C
    return TokenTerms(distill_C, divergence_C, rl_C, kl_C, grad_C if need_grad else None)


def _buckets(student: dv.StudentChunk, rows: BlockRows, settings: BlockSettings) -> dv.Buckets:
    if settings.support == "full":
        assert rows.full_CV is not None, "support='full' needs full log-probs (check_inputs)"
        return dv.full_buckets(student, rows.full_CV)
    ids_CK, teacher_CK, tail_C = rows.topk_ids_CK, rows.topk_logprobs_CK, rows.tail_C
    assert ids_CK is not None and teacher_CK is not None and tail_C is not None, "a top-k (check_inputs)"
    return dv.topk_buckets(student, ids_CK, teacher_CK, tail_C, settings.floor)


def top1_agreement(student_top_C: Tensor, rows: BlockRows, dtype: torch.dtype) -> Tensor:
    """1.0 where the student's most likely token (`student_top_C`) is the teacher's, nan if unknown."""
    if rows.full_CV is not None:
        teacher_top_C = rows.full_CV.argmax(-1)
    elif rows.topk_ids_CK is not None and rows.topk_logprobs_CK is not None and rows.topk_ids_CK.shape[1] > 0:
        best_C1 = rows.topk_logprobs_CK.argmax(-1, keepdim=True)
        teacher_top_C = rows.topk_ids_CK.gather(1, best_C1).squeeze(1)
    else:
        return torch.full(student_top_C.shape, math.nan, dtype=dtype, device=student_top_C.device)
    return (student_top_C == teacher_top_C.long()).to(dtype)


def wants_compile(mode: str, device: torch.device) -> bool:
    """compile 'auto' means CUDA only (on CPU the eager math is as fast and compiling costs minutes)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class BlockFunction:
    """`block_terms` for one settings value, compiled on first use when asked; falls back to eager (and
    logs why) if compiling or running the compiled function fails."""

    def __init__(self, settings: BlockSettings, compiled: bool) -> None:
        self.settings = settings
        row = divergence(settings.divergence)
        self._eager = functools.partial(block_terms, settings, row.function(), row.sampled, True)
        pure = functools.partial(block_terms, settings, row.function(), row.sampled, False)
        self._compiled = torch.compile(pure, dynamic=True) if compiled else None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, logits_CV: Tensor, reverse_weight: float, need_grad: bool, rows: BlockRows) -> BlockTerms:
        if self._compiled is not None and need_grad:
            try:
                return self._compiled(logits_CV, reverse_weight, need_grad, *rows.tensors())
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path is exact
                log.warning(
                    "compiled loss block failed (%s: %s); using the eager path from now on",
                    type(exc).__name__,
                    str(exc)[:300],
                )
                self._compiled = None  # the compiled function never writes its input: the block is intact
        return self._eager(logits_CV, reverse_weight, need_grad, *rows.tensors())


@functools.cache
def block_function(settings: BlockSettings, compiled: bool) -> BlockFunction:
    """One `BlockFunction` per (settings, compiled): compiled code is reused across steps."""
    return BlockFunction(settings, compiled)
