"""Turning rollout groups into packed micro-batches for the loss.

Owns: splitting a step's groups across ranks (disjoint, balanced by tokens),
packing whole groups into micro-batches up to a token budget (first-fit
decreasing; a group larger than the budget gets a micro-batch of its own),
and building one micro-batch's tensors: the packed token row, position ids
restarting at each sequence, a block-diagonal causal mask (so packed
sequences never attend to each other), the rows whose next token is a
response token, and the loss inputs for them. No I/O, no model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.records import RolloutRecord
from student_trainer.loss.inputs import LossInputs, TeacherScores

Group = list[RolloutRecord]


def group_tokens(group: Group) -> int:
    return sum(len(r.prompt_ids) + len(r.response_ids) for r in group)


def split_across_ranks(groups: Sequence[Group], world_size: int) -> list[list[Group]]:
    """Greedy by tokens, largest first: every rank gets whole groups, none shared."""
    shares: list[list[Group]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for group in sorted(groups, key=group_tokens, reverse=True):
        rank = loads.index(min(loads))
        shares[rank].append(group)
        loads[rank] += group_tokens(group)
    return shares


def pack_groups(groups: Sequence[Group], max_tokens: int) -> list[list[Group]]:
    """First-fit decreasing of whole groups into bins of at most `max_tokens` (oversized groups alone)."""
    bins: list[list[Group]] = []
    loads: list[int] = []
    for group in sorted(groups, key=group_tokens, reverse=True):
        size = group_tokens(group)
        for i, load in enumerate(loads):
            if load + size <= max_tokens:
                bins[i].append(group)
                loads[i] += size
                break
        else:
            bins.append([group])
            loads.append(size)
    return bins


@dataclass
class MicroBatch:
    """One packed forward pass: T tokens, N trained rows."""

    input_ids_1T: torch.Tensor
    position_ids_1T: torch.Tensor
    attention_mask_11TT: torch.Tensor | None  # bool, True = may attend; None when T is one sequence
    rows_N: torch.Tensor  # positions whose hidden state predicts a response token
    inputs: LossInputs
    records: list[RolloutRecord]

    @property
    def num_valid_tokens(self) -> int:
        return int((self.inputs.loss_weights > 0).sum())

    def to(self, device: torch.device) -> MicroBatch:
        def mv(t):
            return None if t is None else t.to(device)

        inputs = LossInputs(**{k: mv(getattr(self.inputs, k)) for k in self.inputs.__dataclass_fields__})
        return MicroBatch(
            self.input_ids_1T.to(device),
            self.position_ids_1T.to(device),
            mv(self.attention_mask_11TT),
            self.rows_N.to(device),
            inputs,
            self.records,
        )


def build_micro_batch(
    groups: Sequence[Group], record_weights: dict[str, float], *, block_mask: bool = True
) -> MicroBatch:
    """Pack the groups' sequences into one row. `record_weights` scales each record's loss weights
    (staleness down-weighting); response_mask = 0 (tool tokens) always means weight 0."""
    records = [r for g in groups for r in g]
    ids, pos, seg, rows, targets, weights, behaviour, cu = [], [], [], [], [], [], [], [0]
    offset = 0
    for s, r in enumerate(records):
        seq = np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64)
        p, n = len(r.prompt_ids), len(r.response_ids)
        ids.append(seq)
        pos.append(np.arange(len(seq)))
        seg.append(np.full(len(seq), s))
        rows.append(offset + p - 1 + np.arange(n))  # hidden state at p-1+j predicts response token j
        targets.append(r.response_ids.astype(np.int64))
        weights.append(r.response_mask.astype(np.float32) * record_weights.get(r.rollout_id, 1.0))
        behaviour.append(r.behaviour_logprobs.astype(np.float32))
        offset += len(seq)
        cu.append(cu[-1] + n)
    seg_T = torch.from_numpy(np.concatenate(seg))
    mask = None
    if block_mask and len(records) > 1:
        causal_TT = torch.tril(torch.ones(len(seg_T), len(seg_T), dtype=torch.bool))
        mask = (causal_TT & (seg_T[:, None] == seg_T[None, :]))[None, None]
    group_index = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in records))}
    inputs = LossInputs(
        target_ids=torch.from_numpy(np.concatenate(targets)),
        loss_weights=torch.from_numpy(np.concatenate(weights)),
        cu_seqlens=torch.tensor(cu, dtype=torch.long),
        group_ids=torch.tensor([group_index[r.group_id] for r in records], dtype=torch.long),
        rewards=torch.tensor([0.0 if r.reward is None else float(r.reward) for r in records], dtype=torch.float32),
        behaviour_logprobs=torch.from_numpy(np.concatenate(behaviour)),
    )
    return MicroBatch(
        torch.from_numpy(np.concatenate(ids))[None],
        torch.from_numpy(np.concatenate(pos))[None],
        mask,
        torch.from_numpy(np.concatenate(rows)),
        inputs,
        records,
    )


def teacher_scores_for(
    records: Sequence[RolloutRecord], scores: dict[str, object], temperature: float = 1.0
) -> TeacherScores:
    """Concatenate per-record teacher replies (teacher_server.client.TeacherScores) in record order."""
    parts = [scores[r.rollout_id] for r in records]

    def cat(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(p, name) for p in parts]))

    k = parts[0].topk_ids.shape[1] if parts else 0
    return TeacherScores(
        token_logprobs=cat("token_logprobs"),
        topk_ids=cat("topk_ids").long() if k else None,
        topk_logprobs=cat("topk_logprobs") if k else None,
        tail_logprobs=cat("tail_logprobs") if k else None,
        temperature=temperature,
    )


def placeholder_scores(n: int, k: int, temperature: float) -> TeacherScores:
    """Well-formed teacher scores for rows whose loss weight is 0 (they never reach a gradient)."""
    if not k:
        return TeacherScores(token_logprobs=torch.zeros(n), temperature=temperature)
    return TeacherScores(
        token_logprobs=torch.zeros(n),
        topk_ids=torch.arange(k).repeat(n, 1),
        topk_logprobs=torch.full((n, k), -math.log(k)),
        tail_logprobs=torch.full((n,), -1e4),
        temperature=temperature,
    )


def scores_to(scores: TeacherScores, device: torch.device) -> TeacherScores:
    return dataclasses.replace(
        scores,
        **{
            f.name: getattr(scores, f.name).to(device)
            for f in dataclasses.fields(scores)
            if isinstance(getattr(scores, f.name), torch.Tensor)
        },
    )
