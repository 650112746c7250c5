"""The registry of divergences: name -> function + what it needs from the teacher.

Adding a divergence is one function and one row in `DIVERGENCES`. A row says
which teacher scores the function works on, and that decides its kind:

- `needs=SAMPLED_TOKEN` (only log p_T of the sampled token y, which every
  teacher reply carries): `fn(logp_C, teacher_C, args) -> divergence_C`, a
  per-token estimate from the sampled token; the loss trains it as a policy
  gradient with per-token reward `-divergence` (optionally discounted).
- `needs` among `TOPK` (the teacher's top-k ids plus one tail bucket for the
  rest of the vocabulary) and `FULL` (the whole vocabulary):
  `fn(s_hat_CB, p_hat_CB, t_CB, args) -> (loss_C, dloss/ds_hat_CB)` over
  buckets B, as `student_trainer.loss.divergences` defines them; `loss.support`
  picks the form.

Config validation reads the rows (`LossConfig` refuses an unknown name or a
support the divergence cannot use; `TrainerConfig` refuses `teacher.top_k=0`
when the loss needs the top-k), so a bad combination fails when the config is
loaded, not at the first step. Built-in rows name their function as
"module:attribute" so that loading a config does not import torch; a row may
also hold the callable itself. This module computes nothing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from student_trainer.loss.config import LossConfig


class TeacherNeed(StrEnum):
    """Which part of the teacher's Score reply a divergence reads."""

    SAMPLED_TOKEN = "sampled_token"  # token_logprobs: log p_T of the sampled token
    TOPK = "topk"  # topk_ids, topk_logprobs and tail_logprobs (k > 0)
    FULL = "full"  # full_logprobs [P, V]


SAMPLED = frozenset({TeacherNeed.SAMPLED_TOKEN})
BUCKETS = frozenset({TeacherNeed.TOPK, TeacherNeed.FULL})


@dataclass(frozen=True)
class DivergenceArgs:
    """The per-step constants a divergence function may read."""

    floor: float  # log-prob floor f: s^ = max(s, f), t^ = max(t, f)
    jsd_beta: float = 0.5  # beta of JSD(beta)
    reverse_weight: float = 1.0  # weight of reverse KL in a forward-then-reverse schedule (1 = pure reverse)


@dataclass(frozen=True)
class Divergence:
    """One registry row. `fn` is the callable or "module:attribute"; `scheduled` rows get
    `args.reverse_weight` from `loss.schedule` (else 1); `separable`: the loss is a sum over buckets of
    per-bucket terms and its gradient per bucket reads only that bucket (every built-in one), so it can be
    evaluated on vocabulary tiles (`loss.chunking=tiles` with support "full")."""

    fn: Callable | str
    needs: frozenset[TeacherNeed]
    scheduled: bool = False
    separable: bool = True

    def __post_init__(self) -> None:
        if not self.needs or (TeacherNeed.SAMPLED_TOKEN in self.needs and len(self.needs) > 1):
            raise ValueError(
                f"a divergence needs {{SAMPLED_TOKEN}} or a non-empty subset of {{TOPK, FULL}}, "
                f"got {sorted(self.needs)}"
            )

    @property
    def sampled(self) -> bool:
        """A per-token estimate from the sampled token (trained as a policy gradient)."""
        return self.needs == SAMPLED

    def function(self) -> Callable:
        return _load(self.fn) if isinstance(self.fn, str) else self.fn


@functools.cache
def _load(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_DV = "student_trainer.loss.divergences"
DIVERGENCES: dict[str, Divergence] = {
    "rkl_sampled": Divergence(f"{_DV}:sampled_reverse_kl", SAMPLED),
    "fkl": Divergence(f"{_DV}:forward_kl", BUCKETS),
    "rkl": Divergence(f"{_DV}:reverse_kl", BUCKETS),
    "jsd": Divergence(f"{_DV}:jsd", BUCKETS),
    "fkl_to_rkl": Divergence(f"{_DV}:forward_then_reverse_kl", BUCKETS, scheduled=True),
}


def divergence(name: str) -> Divergence:
    """The row of `name`; a ValueError listing the registered names otherwise."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; registered: {', '.join(sorted(DIVERGENCES))} "
            f"(add one in student_trainer/loss/registry.py)"
        ) from None


def divergence_need(config: LossConfig) -> TeacherNeed:
    """The part of the teacher's reply the configured divergence reads."""
    return TeacherNeed.SAMPLED_TOKEN if divergence(config.divergence).sampled else TeacherNeed(config.support)


def selection_need(config: LossConfig) -> TeacherNeed | None:
    """The part TIP token selection reads (its JSD term), if any."""
    ts = config.token_selection
    return TeacherNeed(ts.jsd_support) if ts.enabled and ts.divergence_exponent > 0 else None


def teacher_needs(config: LossConfig) -> frozenset[TeacherNeed]:
    """Every part of the teacher's reply a loss with this config reads (the sampled token's log-prob always)."""
    needs = {TeacherNeed.SAMPLED_TOKEN, divergence_need(config), selection_need(config)}
    return frozenset(n for n in needs if n is not None)
