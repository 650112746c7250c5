"""Recipe: teacher-token diagnostics (entropy over top-k + tail, a lower bound; p_T of the sampled token;
share inside the top-k), tool-episode counts and missing rewards, per step and per eval round.

References are float64 from a full teacher distribution written out per row (tolerance: float64 sums of < 30
terms, 1e-12 relative); the lower-bound property is checked against the full entropy.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from student_trainer.diagnostics import reward_stats, teacher_token_sums, tool_stats
from student_trainer.groups.eval import eval_report
from tests.fixtures.rollout import make_rollout

pytestmark = pytest.mark.timeout(60)

N, V, K = 12, 30, 4


def teacher_reply(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    ids = full.topk(K, -1).indices
    topk = full.gather(1, ids)
    in_topk = torch.zeros_like(full, dtype=torch.bool).scatter(1, ids, True)
    tail = full.masked_fill(in_topk, -math.inf).logsumexp(-1)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:3] = ids[:3, 0]  # some sampled tokens inside the top-k for sure
    return full, ids, topk, tail, targets


def test_teacher_diagnostics_match_a_hand_computed_float64_reference():
    full, ids, topk, tail, targets = teacher_reply()
    valid = torch.ones(N, dtype=torch.bool)
    valid[[4, 7]] = False
    got = teacher_token_sums(full.gather(1, targets[:, None]).squeeze(1), targets, valid, ids, topk, tail).means()
    rows = valid.nonzero().flatten().tolist()
    entropies, p_sampled, inside = [], [], []
    for i in rows:
        buckets = [math.exp(x) for x in topk[i].tolist()] + [math.exp(tail[i].item())]
        entropies.append(-sum(q * math.log(q) for q in buckets))
        p_sampled.append(math.exp(full[i, targets[i]].item()))
        inside.append(float(targets[i].item() in ids[i].tolist()))
    assert got["teacher_entropy_topk_tail"] == pytest.approx(sum(entropies) / len(rows), rel=1e-12)
    assert got["teacher_p_sampled"] == pytest.approx(sum(p_sampled) / len(rows), rel=1e-12)
    assert got["sampled_in_teacher_topk"] == pytest.approx(sum(inside) / len(rows), rel=1e-12)
    assert 0 < got["sampled_in_teacher_topk"] < 1


def test_the_topk_tail_entropy_is_a_lower_bound_of_the_full_entropy_and_exact_when_k_is_v():
    full, ids, topk, tail, targets = teacher_reply(seed=3)
    all_rows = torch.ones(N, dtype=torch.bool)
    per_row = [
        teacher_token_sums(
            full[i : i + 1, 0], targets[i : i + 1], all_rows[:1], ids[i : i + 1], topk[i : i + 1], tail[i : i + 1]
        ).means()["teacher_entropy_topk_tail"]
        for i in range(N)
    ]
    exact = -(full.exp() * full).sum(-1)
    assert all(lb <= h + 1e-12 for lb, h in zip(per_row, exact.tolist(), strict=True))
    assert any(lb < h - 1e-3 for lb, h in zip(per_row, exact.tolist(), strict=True))
    every_id = full.topk(V, -1).indices
    whole = teacher_token_sums(
        full[:, 0],
        targets,
        all_rows,
        every_id,
        full.gather(1, every_id),
        torch.full((N,), -math.inf, dtype=torch.float64),
    )
    assert whole.means()["teacher_entropy_topk_tail"] == pytest.approx(exact.mean().item(), rel=1e-12)


def test_without_a_topk_only_the_sampled_tokens_probability_is_measured():
    full, _, _, _, targets = teacher_reply()
    got = teacher_token_sums(full.gather(1, targets[:, None]).squeeze(1), targets, torch.ones(N, dtype=torch.bool))
    assert set(got.means()) == {"teacher_p_sampled"}


def tool_rollout(index: int, turns: int, tool_calls: int, tool_tokens: int):
    record = make_rollout(index, num_tokens=10)
    record.response_mask[:tool_tokens] = 0
    record.meta = {"turns": turns, "tool_calls": tool_calls}
    return record


def test_tool_stats_count_tool_episodes_their_tool_tokens_and_mean_turns():
    records = [tool_rollout(0, 3, 2, 4), tool_rollout(1, 2, 1, 3), tool_rollout(2, 1, 0, 0)]
    assert tool_stats(records) == {"tool_episodes": 2.0, "tool_tokens": 7.0, "tool_turns_mean": 2.5}
    assert math.isnan(tool_stats(records[2:])["tool_turns_mean"])


def test_reward_stats_leave_missing_rewards_out_of_the_pass_rate_and_count_them():
    records = [make_rollout(i) for i in range(4)]
    records[0].reward, records[1].reward, records[2].reward, records[3].reward = 1.0, None, 0.0, 0.6
    assert reward_stats(records, threshold=0.5) == {"rewards_scored": 3.0, "rewards_missing": 1.0, "pass_rate": 2 / 3}


def test_an_eval_round_reports_the_teacher_diagnostics_tools_and_missing_rewards():
    full, ids, topk, tail, _ = teacher_reply()
    records = [tool_rollout(0, 2, 1, 3), make_rollout(1, num_tokens=10)]
    records[1].reward = None
    scores = {}
    for r in records:
        t = torch.from_numpy(r.response_ids.astype(np.int64))
        scores[r.rollout_id] = SimpleNamespace(
            token_logprobs=full[:10].gather(1, t[:, None] % V).squeeze(1).float().numpy(),
            topk_ids=ids[:10].int().numpy(),
            topk_logprobs=topk[:10].float().numpy(),
            tail_logprobs=tail[:10].float().numpy(),
        )
    report = eval_report(records, scores)
    want = teacher_token_sums(
        torch.cat(
            [torch.from_numpy(scores[r.rollout_id].token_logprobs[r.response_mask.astype(bool)]) for r in records]
        ),
        torch.cat([torch.from_numpy(r.response_ids[r.response_mask.astype(bool)]) for r in records]),
        torch.ones(17, dtype=torch.bool),
        torch.cat([torch.from_numpy(scores[r.rollout_id].topk_ids[r.response_mask.astype(bool)]) for r in records]),
        torch.cat(
            [torch.from_numpy(scores[r.rollout_id].topk_logprobs[r.response_mask.astype(bool)]) for r in records]
        ),
        torch.cat(
            [torch.from_numpy(scores[r.rollout_id].tail_logprobs[r.response_mask.astype(bool)]) for r in records]
        ),
    ).means()
    for key, value in want.items():
        assert report[key] == pytest.approx(value, rel=1e-12)
    assert report["tool_episodes"] == 1 and report["tool_tokens"] == 3 and report["tool_turns_mean"] == 2
    assert report["rewards_missing"] == 1 and report["pass_at_1"] == 0.0  # make_rollout(0) has reward 0
    no_teacher = eval_report(records, {})
    assert math.isnan(no_teacher["divergence"]) and math.isnan(no_teacher["teacher_p_sampled"])
