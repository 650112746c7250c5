"""Data that crosses the loss entry point, and its validation at that boundary.

Owns `TeacherTensors` (the teacher's reply for the trained positions, as the
gRPC Score reply in protos/teacher.proto defines it: actual-token log-prob, optional
top-k ids / log-probs with the tail log-mass, optional full log-probs),
`LossInputs` (targets, weights, sequence boundaries, groups, rewards,
behaviour log-probs), `LossStats` (plain numbers returned per step) and
`check_inputs`, which raises `ValueError` naming what to change. It computes
nothing else; inside the loss the inputs are trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from student_trainer.loss.config import LossConfig
from student_trainer.loss.registry import divergence


@dataclass(frozen=True)
class TeacherTensors:
    """Teacher log-probs for the N trained positions as tensors (any float dtype; taken as given): the loss's
    input, built from `teacher_server.client.TeacherScores` replies by `student_trainer.batching`."""

    token_logprobs: Tensor  # [N] log p_T(actual token)
    topk_ids: Tensor | None = None  # [N, k] int
    topk_logprobs: Tensor | None = None  # [N, k]
    tail_logprobs: Tensor | None = None  # [N] log of the teacher mass outside the top-k
    full_logprobs: Tensor | None = None  # [N, V], only when the teacher sent them
    temperature: float = 1.0  # the temperature the teacher applied

    @property
    def top_k(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[1])


@dataclass(frozen=True)
class LossInputs:
    """Per-token and per-sequence inputs; the rows of one sequence are contiguous."""

    target_ids: Tensor  # [N] int, the sampled (actual) tokens
    loss_weights: Tensor  # [N] float >= 0; 0 = no loss (tool tokens, padding), else a token weight s
    # (e.g. staleness) that scales the row's term; normalisations count rows, never sum these weights
    cu_seqlens: Tensor  # [S + 1] int: 0 = cu[0] <= ... <= cu[S] = N
    group_ids: Tensor | None = None  # [S] int, samples of one prompt share an id
    rewards: Tensor | None = None  # [S] float; NaN = no reward (None in the record): left out of reward terms
    behaviour_logprobs: Tensor | None = None  # [N] sampler log-probs (after temperature)
    # Group-level quantities computed over whole groups before a split (`planning.sequence_weights`);
    # None: computed here from `rewards` and `group_ids`, which then must hold whole groups.
    sample_weights: Tensor | None = None  # [S] recipe sample weight r (reward softmax x pass rate)
    advantages: Tensor | None = None  # [S] GRPO advantage of each sequence
    reference_logprobs: Tensor | None = None  # [N] log p_ref(target) of the frozen initial student (KL penalty)


@dataclass
class LossStats:
    """Per-step statistics: means over kept tokens, nan when nothing defines them."""

    loss: float  # a * distill_loss + b * rl_loss
    distill_loss: float  # the distillation term before its weight a (computed even when a = 0)
    rl_loss: float  # the GRPO term before its weight b (0 when b = 0)
    mean_divergence: float  # per-token divergence (rkl_sampled: log p_S(y) - log p_T(y))
    student_entropy: float  # nats
    top1_agreement: float  # share of tokens where argmax p_S == argmax p_T (nan if k = 0)
    fraction_kept: float  # kept / valid tokens (TIP)
    num_tokens: int  # valid tokens (loss weight > 0)
    num_kept_tokens: int
    reverse_kl_weight: float  # schedule weight of reverse KL (fkl_to_rkl), else 1
    reference_kl: float = float("nan")  # mean KL-penalty estimate of KL(p_S || p_ref) over the RL rows (nan: off)


def check_inputs(
    hidden_NH: Tensor, weight_VH: Tensor, inputs: LossInputs, teacher: TeacherTensors, config: LossConfig
) -> None:
    """Raise ValueError if the tensors do not fit each other or the config."""
    n, v = _check_shapes(hidden_NH, weight_VH, inputs, teacher)
    _check_teacher_forms(teacher, config, v)
    _check_sequences(inputs, config, n)
    if teacher.temperature != config.teacher_temperature:
        raise ValueError(
            f"teacher scores were made at temperature {teacher.temperature}, but "
            f"loss.teacher_temperature is {config.teacher_temperature}: make them match"
        )


def _check_shapes(hidden_NH: Tensor, weight_VH: Tensor, inputs: LossInputs, teacher: TeacherTensors) -> tuple[int, int]:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"hidden [N, H] and lm-head weight [V, H] expected, got {tuple(hidden_NH.shape)} "
            f"and {tuple(weight_VH.shape)}"
        )
    n, v = hidden_NH.shape[0], weight_VH.shape[0]
    for name, tensor in (
        ("inputs.target_ids", inputs.target_ids),
        ("inputs.loss_weights", inputs.loss_weights),
        ("teacher.token_logprobs", teacher.token_logprobs),
        ("inputs.behaviour_logprobs", inputs.behaviour_logprobs),
        ("inputs.reference_logprobs", inputs.reference_logprobs),
        ("teacher.tail_logprobs", teacher.tail_logprobs),
    ):
        if tensor is not None and tuple(tensor.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(tensor.shape)}")
    if n and (int(inputs.target_ids.min()) < 0 or int(inputs.target_ids.max()) >= v):
        raise ValueError(f"inputs.target_ids must lie in [0, {v})")
    if n and float(inputs.loss_weights.min()) < 0:
        raise ValueError("inputs.loss_weights must be >= 0")
    if teacher.full_logprobs is not None and tuple(teacher.full_logprobs.shape) != (n, v):
        raise ValueError(f"teacher.full_logprobs must have shape [{n}, {v}], got {tuple(teacher.full_logprobs.shape)}")
    return n, v


def _check_teacher_forms(teacher: TeacherTensors, config: LossConfig, vocab_size: int) -> None:
    k = teacher.top_k
    if teacher.topk_ids is not None:
        if teacher.topk_logprobs is None or teacher.topk_logprobs.shape != teacher.topk_ids.shape:
            raise ValueError("teacher.topk_logprobs must have the shape of teacher.topk_ids [N, k]")
        if k > 0 and teacher.tail_logprobs is None:
            raise ValueError("teacher.tail_logprobs is required with a top-k (k > 0)")
        if k > vocab_size:
            raise ValueError(f"teacher top-k k={k} exceeds the vocabulary size {vocab_size}")
    over_buckets = not divergence(config.divergence).sampled
    if over_buckets and config.support == "topk" and k == 0:
        raise ValueError(
            f"divergence={config.divergence!r} with support='topk' needs the teacher's top-k log-probs, "
            "but the teacher sent k=0: request top_k > 0 from the teacher, use support='full' with "
            "full log-probs, or use divergence='rkl_sampled' (needs only the actual-token log-prob)"
        )
    if over_buckets and config.support == "full" and teacher.full_logprobs is None:
        raise ValueError(
            f"divergence={config.divergence!r} with support='full' needs teacher.full_logprobs; "
            "request full log-probs from the teacher or set support='topk'"
        )
    ts = config.token_selection
    if ts.enabled and ts.divergence_exponent > 0:
        if ts.jsd_support == "topk" and k == 0:
            raise ValueError(
                "token_selection.divergence_exponent > 0 with jsd_support='topk' needs the teacher's top-k "
                "(k > 0); set divergence_exponent=0 (entropy only) or request top_k > 0"
            )
        if ts.jsd_support == "full" and teacher.full_logprobs is None:
            raise ValueError("token_selection.jsd_support='full' needs teacher.full_logprobs")


def _check_sequences(inputs: LossInputs, config: LossConfig, n: int) -> None:
    cu = inputs.cu_seqlens
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() < 0).any()):
        raise ValueError(f"inputs.cu_seqlens must be non-decreasing from 0 to N={n}")
    num_seqs = cu.numel() - 1
    for name, tensor in (("inputs.sample_weights", inputs.sample_weights), ("inputs.advantages", inputs.advantages)):
        if tensor is not None and tuple(tensor.shape) != (num_seqs,):
            raise ValueError(f"{name} must have shape [{num_seqs}] (one per sequence), got {tuple(tensor.shape)}")
    needs_rewards = (config.rl_weight > 0 and inputs.advantages is None) or (
        (config.reward_softmax.enabled or config.pass_rate.enabled) and inputs.sample_weights is None
    )
    if needs_rewards:
        for name, tensor in (("inputs.rewards", inputs.rewards), ("inputs.group_ids", inputs.group_ids)):
            if tensor is None or tuple(tensor.shape) != (num_seqs,):
                raise ValueError(
                    f"{name} of shape [{num_seqs}] is required by rl_weight > 0, reward_softmax or pass_rate "
                    "(or pass inputs.sample_weights / inputs.advantages computed over whole groups)"
                )
        if inputs.rewards is not None and bool(inputs.rewards.isinf().any()):  # not None: checked just above
            raise ValueError(
                "inputs.rewards must be finite, or NaN for a sample without a reward (timed out, raised, no "
                "reference answer); got an infinite reward"
            )
    if config.kl.coef > 0 and inputs.reference_logprobs is None:
        raise ValueError(
            "loss.kl.coef > 0 needs inputs.reference_logprobs (the reference policy's log-probs of the targets); "
            "the trainer computes them when it holds the reference policy"
        )
    uses_pg = divergence(config.divergence).sampled or config.rl_weight > 0
    if uses_pg and config.policy_gradient.importance == "ppo_clip" and inputs.behaviour_logprobs is None:
        raise ValueError(
            "policy_gradient.importance='ppo_clip' needs inputs.behaviour_logprobs; send them or set importance='none'"
        )
