"""Turning rollout groups into packed micro-batches for the loss.

Owns: splitting a step's groups across ranks and packing them into
micro-batches up to a token budget, or of a fixed number of sequences in
order (`split_by_sequences`, the recipe's) (a group that fits is kept whole; a larger
one is split by sequence, so one group of 8 x 12k tokens spreads over
micro-batches and ranks; a single sequence longer than the budget gets a
micro-batch of its own, one longer than the model's context is left out with
an error that says so), and
building one micro-batch's tensors: the packed token row, position ids
restarting at each sequence, the sequence bounds the packed attention reads
(or, for the reference path, a block-diagonal causal `[T, T]` mask), the rows
whose next token is a response token, and the loss inputs for them, with the
group-level weights computed over whole groups beforehand. No I/O, no model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from student_trainer.groups import Group
from student_trainer.loss.compute import LossInputs, TeacherTensors

if TYPE_CHECKING:
    from protos.records import RolloutRecord
    from teacher_server.client import TeacherScores as TeacherReply


def reward_value(record: RolloutRecord) -> float:
    """The record's reward as a float; NaN when it has none (timed out, raised, no reference answer), never 0."""
    return math.nan if record.reward is None else float(record.reward)


def sequence_tokens(record: RolloutRecord) -> int:
    return len(record.prompt_ids) + len(record.response_ids)


def group_tokens(group: Group) -> int:
    return sum(sequence_tokens(r) for r in group)


def without_too_long(groups: Iterable[Group], max_model_len: int) -> tuple[list[Group], list[RolloutRecord]]:
    """(the groups without rollouts longer than `max_model_len` tokens, those rollouts)."""
    kept: list[Group] = []
    too_long: list[RolloutRecord] = []
    for group in groups:
        long = [r for r in group if sequence_tokens(r) > max_model_len]
        too_long += long
        if not long:
            kept.append(group)
        elif len(long) < len(group):
            kept.append([r for r in group if sequence_tokens(r) <= max_model_len])
    return kept, too_long


def too_long_message(record: RolloutRecord, max_model_len: int) -> str:
    return (
        f"rollout {record.rollout_id!r} has {sequence_tokens(record)} tokens (prompt {len(record.prompt_ids)} + "
        f"response {len(record.response_ids)}), more than the student's context of {max_model_len}: not trained; "
        "cap the rollout workers' response length (sampling.max_tokens) or use a student with a longer "
        "max_position_embeddings"
    )


def _units(groups: Sequence[Group], limit: float) -> list[Group]:
    """Whole groups of at most `limit` tokens (the same list objects); larger groups as one unit per sequence."""
    units: list[Group] = []
    for group in groups:
        if group_tokens(group) <= limit:
            units.append(group)
        else:
            units.extend([r] for r in group)
    return units


def split_across_ranks(groups: Sequence[Group], world_size: int) -> list[list[Group]]:
    """Disjoint shares balanced by tokens (largest first to the least loaded rank). A group larger than a
    fair share (total / world size) is split by sequence; each share is a list of groups or parts of one."""
    shares: list[list[Group]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    fair = math.ceil(sum(group_tokens(g) for g in groups) / max(world_size, 1))
    for unit in sorted(_units(groups, fair), key=group_tokens, reverse=True):
        rank = loads.index(min(loads))
        shares[rank].append(unit)
        loads[rank] += group_tokens(unit)
    return [_merge_parts(share) for share in shares]


def _merge_parts(share: list[Group]) -> list[Group]:
    """Parts of one group on the same rank back into one list (first-seen order); a whole group stays the
    caller's list object."""
    merged: dict[str, list[Group]] = {}
    for unit in share:
        merged.setdefault(unit[0].group_id, []).append(unit)
    return [units[0] if len(units) == 1 else [r for u in units for r in u] for units in merged.values()]


def pack_groups(groups: Sequence[Group], max_tokens: int) -> list[list[Group]]:
    """First-fit decreasing into bins of at most `max_tokens`: groups that fit stay whole, larger groups are
    split by sequence, and a sequence longer than `max_tokens` gets a bin of its own."""
    bins: list[list[Group]] = []
    loads: list[int] = []
    for unit in sorted(_units(groups, max_tokens), key=group_tokens, reverse=True):
        size = group_tokens(unit)
        for i, load in enumerate(loads):
            if load + size <= max_tokens:
                bins[i].append(unit)
                loads[i] += size
                break
        else:
            bins.append([unit])
            loads.append(size)
    return bins


def split_by_sequences(groups: Sequence[Group], num_sequences: int) -> list[list[Group]]:
    """Micro-batches of `num_sequences` sequences each (the last may hold fewer), in the order given, as the
    recipe's verl worker splits a rank's batch (`data.split(ppo_micro_batch_size_per_gpu)`); groups are cut
    wherever the count falls. Each bin holds one list of its records."""
    records = [r for g in groups for r in g]
    return [[records[i : i + num_sequences]] for i in range(0, len(records), num_sequences)]


def filler_record(record: RolloutRecord) -> RolloutRecord:
    """A two-token copy of `record` (one response token, mask 0): the cheapest forward/backward a rank with
    no micro-batch left runs so that every rank takes part in the same FSDP collectives."""
    return dataclasses.replace(
        record,
        rollout_id=f"{record.rollout_id}#filler",
        prompt_ids=record.prompt_ids[:1] if len(record.prompt_ids) else record.response_ids[:1],
        response_ids=record.response_ids[:1],
        response_mask=np.zeros(1, np.uint8),
        behaviour_logprobs=np.zeros(1, np.float32),
    )


@dataclass
class MicroBatch:
    """One packed forward pass: T tokens of S sequences, N trained rows."""

    input_ids_1T: torch.Tensor
    position_ids_1T: torch.Tensor
    cu_tokens: tuple[int, ...]  # sequence bounds in the packed row: (0, ..., T)
    attention_mask_11TT: torch.Tensor | None  # reference path only: bool, True = may attend
    rows_N: torch.Tensor  # positions whose hidden state predicts a response token
    inputs: LossInputs
    records: list[RolloutRecord]
    filler: bool = False  # a zero-weight pass for FSDP's collectives (teacher placeholders)

    @property
    def num_valid_tokens(self) -> int:
        return int((self.inputs.loss_weights > 0).sum())

    @property
    def num_tokens(self) -> int:
        return self.cu_tokens[-1]

    def to(self, device: torch.device) -> MicroBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        inputs = dataclasses.replace(
            self.inputs, **{k: mv(getattr(self.inputs, k)) for k in self.inputs.__dataclass_fields__}
        )
        return dataclasses.replace(
            self,
            input_ids_1T=self.input_ids_1T.to(device),
            position_ids_1T=self.position_ids_1T.to(device),
            attention_mask_11TT=mv(self.attention_mask_11TT),
            rows_N=self.rows_N.to(device),
            inputs=inputs,
        )


def build_micro_batch(
    groups: Sequence[Group],
    record_weights: dict[str, float],
    *,
    block_mask: bool = False,
    sample_weights: dict[str, float] | None = None,
    advantages: dict[str, float] | None = None,
) -> MicroBatch:
    """Pack the groups' sequences into one row.

    `record_weights` scales each record's token weights (staleness s; absent:
    1); response_mask = 0 (tool tokens) always means weight 0. `sample_weights`
    and `advantages` (rollout id -> r, GRPO advantage), computed over whole
    groups, are passed to the loss when given. `block_mask=True` builds the
    dense `[T, T]` reference mask instead of relying on packed attention.
    """
    records = [r for g in groups for r in g]
    ids, pos, rows, targets, weights, behaviour, cu, bounds = [], [], [], [], [], [], [0], [0]
    for r in records:
        seq = np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64)
        p, n = len(r.prompt_ids), len(r.response_ids)
        ids.append(seq)
        pos.append(np.arange(len(seq)))
        rows.append(bounds[-1] + p - 1 + np.arange(n))  # hidden state at p-1+j predicts response token j
        targets.append(r.response_ids.astype(np.int64))
        weights.append(r.response_mask.astype(np.float32) * record_weights.get(r.rollout_id, 1.0))
        behaviour.append(r.behaviour_logprobs.astype(np.float32))
        bounds.append(bounds[-1] + len(seq))
        cu.append(cu[-1] + n)
    group_index = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in records))}

    def per_sequence(values: dict[str, float] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor([values[r.rollout_id] for r in records], dtype=torch.float64)

    inputs = LossInputs(
        target_ids=torch.from_numpy(np.concatenate(targets)),
        loss_weights=torch.from_numpy(np.concatenate(weights)),
        cu_seqlens=torch.tensor(cu, dtype=torch.long),
        group_ids=torch.tensor([group_index[r.group_id] for r in records], dtype=torch.long),
        rewards=torch.tensor([reward_value(r) for r in records], dtype=torch.float32),
        behaviour_logprobs=torch.from_numpy(np.concatenate(behaviour)),
        sample_weights=per_sequence(sample_weights),
        advantages=per_sequence(advantages),
    )
    return MicroBatch(
        input_ids_1T=torch.from_numpy(np.concatenate(ids))[None],
        position_ids_1T=torch.from_numpy(np.concatenate(pos))[None],
        cu_tokens=tuple(bounds),
        attention_mask_11TT=dense_mask(bounds) if block_mask and len(records) > 1 else None,
        rows_N=torch.from_numpy(np.concatenate(rows)),
        inputs=inputs,
        records=records,
    )


def dense_mask(cu_tokens: Sequence[int]) -> torch.Tensor:
    """The reference block-diagonal causal mask [1, 1, T, T] (bool, True = may attend): quadratic in T."""
    lengths = torch.tensor([e - s for s, e in zip(cu_tokens[:-1], cu_tokens[1:], strict=True)])
    seg_T = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    causal_TT = torch.tril(torch.ones(len(seg_T), len(seg_T), dtype=torch.bool))
    return (causal_TT & (seg_T[:, None] == seg_T[None, :]))[None, None]


def teacher_scores_for(
    records: Sequence[RolloutRecord], scores: Mapping[str, TeacherReply], temperature: float = 1.0
) -> TeacherTensors:
    """Concatenate per-record teacher replies (teacher_server.client.TeacherScores) in record order;
    full-vocabulary log-probs when every reply carries them."""
    parts = [scores[r.rollout_id] for r in records]

    def cat(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(p, name) for p in parts]))

    k = parts[0].topk_ids.shape[1] if parts else 0
    full = parts and all(getattr(p, "full_logprobs", None) is not None for p in parts)
    return TeacherTensors(
        token_logprobs=cat("token_logprobs"),
        topk_ids=cat("topk_ids").long() if k else None,
        topk_logprobs=cat("topk_logprobs") if k else None,
        tail_logprobs=cat("tail_logprobs") if k else None,
        full_logprobs=cat("full_logprobs") if full else None,
        temperature=temperature,
    )


def placeholder_scores(n: int, k: int, temperature: float, vocab_size: int | None = None) -> TeacherTensors:
    """Well-formed teacher scores for rows whose loss weight is 0 (they never reach a gradient);
    with `vocab_size`, uniform full-vocabulary log-probs too."""
    full = None if vocab_size is None else torch.full((n, vocab_size), -math.log(vocab_size))
    if not k:
        return TeacherTensors(token_logprobs=torch.zeros(n), full_logprobs=full, temperature=temperature)
    return TeacherTensors(
        token_logprobs=torch.zeros(n),
        topk_ids=torch.arange(k).repeat(n, 1),
        topk_logprobs=torch.full((n, k), -math.log(k)),
        tail_logprobs=torch.full((n,), -1e4),
        full_logprobs=full,
        temperature=temperature,
    )


def scores_to(scores: TeacherTensors, device: torch.device) -> TeacherTensors:
    return dataclasses.replace(
        scores,
        **{
            f.name: getattr(scores, f.name).to(device)
            for f in dataclasses.fields(scores)
            if isinstance(getattr(scores, f.name), torch.Tensor)
        },
    )
