"""Packing rollouts: groups whole when they fit and split by sequence when not, token budgets, disjoint rank
shares, rows that predict response tokens, and the reference mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.records import RolloutRecord
from student_trainer.batching import (
    build_micro_batch,
    dense_mask,
    filler_record,
    group_tokens,
    pack_groups,
    sequence_tokens,
    split_across_ranks,
    too_long_message,
    without_too_long,
)

pytestmark = pytest.mark.timeout(30)


def record(
    rid: str, group: str, prompt: list[int], response: list[int], mask: list[int] | None = None, version: int = 0
) -> RolloutRecord:
    n = len(response)
    return RolloutRecord(
        rollout_id=rid,
        prompt_id=group,
        group_id=group,
        group_size=2,
        split="train",
        prompt_ids=np.array(prompt, np.int32),
        response_ids=np.array(response, np.int32),
        response_mask=np.array(mask or [1] * n, np.uint8),
        behaviour_logprobs=np.arange(n, dtype=np.float32) * -0.1,
        reward=1.0,
        policy_version=version,
    )


def groups_of_sizes(*sizes: int) -> list[list[RolloutRecord]]:
    return [
        [record(f"g{i}a", f"g{i}", [1] * (s // 2 - 1), [2]), record(f"g{i}b", f"g{i}", [1] * (s // 2 - 1), [3])]
        for i, s in enumerate(sizes)
    ]


def test_pack_groups_keeps_groups_whole_and_under_the_budget():
    groups = groups_of_sizes(10, 20, 30, 40, 8)
    bins = pack_groups(groups, max_tokens=50)
    assert sorted(g[0].group_id for b in bins for g in b) == sorted(g[0].group_id for g in groups)
    assert all(sum(group_tokens(g) for g in b) <= 50 for b in bins)
    assert len(bins) == 3  # 40+10, 30+20, 8


def test_a_group_over_the_budget_is_split_by_sequence_and_a_long_sequence_gets_a_bin_of_its_own():
    big = [record(f"b{i}", "big", [1] * 10, [2] * (5 + 10 * i)) for i in range(4)]  # 15, 25, 35, 45 tokens
    small = groups_of_sizes(10)
    bins = pack_groups([big, *small], max_tokens=40)
    assert all(sum(group_tokens(g) for g in b) <= 40 or len(b) == 1 and len(b[0]) == 1 for b in bins)
    assert [sequence_tokens(b[0][0]) for b in bins if sequence_tokens(b[0][0]) > 40] == [45]
    packed = sorted(r.rollout_id for b in bins for g in b for r in g)
    assert packed == sorted(r.rollout_id for g in [big, *small] for r in g)  # each sequence exactly once
    assert any(g is small[0] for b in bins for g in b)  # a group that fits stays whole (the same list)


def test_ranks_get_disjoint_balanced_shares():
    groups = groups_of_sizes(40, 30, 20, 10, 10, 10)
    shares = split_across_ranks(groups, 2)
    ids = [[g[0].group_id for g in share] for share in shares]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 6
    loads = [sum(group_tokens(g) for g in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 10
    assert all(any(g is h for h in groups) for share in shares for g in share)  # whole groups: same objects


def test_a_group_larger_than_a_fair_share_is_split_across_ranks():
    big = [record(f"b{i}", "big", [1] * 9, [2]) for i in range(8)]  # 8 x 10 tokens, one group
    shares = split_across_ranks([big, *groups_of_sizes(20)], 2)
    ids = [sorted(r.rollout_id for g in share for r in g) for share in shares]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 10
    loads = [sum(group_tokens(g) for g in share) for share in shares]
    assert loads == [50, 50]
    assert all(len({r.group_id for r in g}) == 1 for share in shares for g in share)  # parts stay per group


def test_a_sequence_longer_than_the_context_is_left_out_with_a_message_naming_it():
    ok, long = record("ok", "g", [1] * 4, [2] * 4), record("long", "g", [1] * 4, [2] * 5)
    other = [record("x", "h", [1], [2])]
    kept, too_long = without_too_long([[ok, long], other], 8)
    assert kept == [[ok], other] and kept[1] is other and too_long == [long]
    assert "rollout 'long' has 9 tokens" in too_long_message(long, 8) and "context of 8" in too_long_message(long, 8)


def test_filler_is_two_tokens_with_no_loss_weight():
    f = filler_record(record("a", "g", [5, 6, 7], [8, 9]))
    mb = build_micro_batch([[f]], {})
    assert mb.input_ids_1T.tolist() == [[5, 8]] and mb.num_valid_tokens == 0


def test_micro_batch_rows_predict_response_tokens_and_sequences_do_not_see_each_other():
    a = record("a", "g", [5, 6, 7], [8, 9], mask=[1, 0])
    b = record("b", "g", [10], [11, 12, 13], version=3)
    mb = build_micro_batch([[a, b]], {"b": 0.5}, block_mask=True)
    assert mb.input_ids_1T.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert mb.position_ids_1T.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert mb.rows_N.tolist() == [2, 3, 5, 6, 7]  # hidden state p-1 predicts token p
    assert mb.inputs.target_ids.tolist() == [8, 9, 11, 12, 13]
    assert mb.inputs.loss_weights.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]  # tool token 0, stale record halved
    assert mb.inputs.cu_seqlens.tolist() == [0, 2, 5]
    mask = mb.attention_mask_11TT[0, 0]
    assert mask[6, 5] and mask[6, 6] and not mask[6, 4]  # b attends to itself, never to a
    assert not mask[2, 3] and mask[3, 0]  # causal inside a
    assert mb.num_valid_tokens == 4 and mb.cu_tokens == (0, 5, 9)
    assert build_micro_batch([[a, b]], {}).attention_mask_11TT is None  # packed attention: no [T, T] mask
    assert torch.equal(dense_mask(mb.cu_tokens), mb.attention_mask_11TT)
    assert torch.equal(mb.inputs.behaviour_logprobs, torch.tensor([0.0, -0.1, 0.0, -0.1, -0.2]))
