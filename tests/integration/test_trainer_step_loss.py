"""The step loss L = sum_i s_i r_i l_i / D holds however a step is cut (micro-batches, ranks) and stale
weights scale it.

All runs are float64 (unit roundoff u = 2^-53 ~ 1.1e-16). The runs compared
add the same per-token terms in other orders (other micro-batch shapes, other
ranks, FSDP's reduce-scatter); reordering a sum of n terms moves it by at most
~n u sum|t| (Higham, Accuracy and Stability, sec. 4.2). With n < 500 token
positions per gradient element that is < 1e-12 of the gradient's scale, so
`rtol=1e-9` (of each tensor's largest entry) has three orders of margin, while
a group-level weight computed over part of a group, a token counted twice or a
denominator off by one micro-batch moves gradients by >= 1e-3 of their scale.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.fixtures.split_step import make_runner, step_gradients, synthetic_groups
from tests.fixtures.torchrun import run_torchrun

pytestmark = pytest.mark.timeout(300)

UNSPLIT, SPLIT = 100_000, 60  # token budgets: the big group (~8 x 25 tokens) fits / is cut by sequence


def assert_same_step(got: tuple[dict, dict], want: tuple[dict, dict], scale_factor: float = 1.0) -> None:
    (stats, grads), (want_stats, want_grads) = got, want
    assert stats["loss"] == pytest.approx(scale_factor * want_stats["loss"], rel=1e-9, abs=1e-12)
    assert stats["tokens"] == want_stats["tokens"]
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item() * scale_factor
        torch.testing.assert_close(grad, scale_factor * want_grads[name], rtol=0, atol=1e-9 * scale + 1e-15, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "sum"])
def test_a_group_split_across_micro_batches_gives_the_unsplit_step(tiny_model_dir, normalization):
    stats, grads, micro_split = step_gradients(str(tiny_model_dir), SPLIT, normalization)
    want_stats, want_grads, micro_whole = step_gradients(str(tiny_model_dir), UNSPLIT, normalization)
    assert micro_whole == 1 and micro_split >= 4  # the big group really was cut
    assert_same_step((stats, grads), (want_stats, want_grads))


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "sum"])
def test_a_step_of_stale_groups_at_weight_w_is_w_times_the_fresh_step(tiny_model_dir, normalization):
    """The stale factor must not cancel in any normalisation."""
    w = 0.25
    stale = step_gradients(str(tiny_model_dir), SPLIT, normalization, stale_weight=w)
    fresh = step_gradients(str(tiny_model_dir), SPLIT, normalization)
    assert_same_step(stale[:2], fresh[:2], scale_factor=w)


def test_a_rollout_longer_than_the_context_is_left_out_and_counted_not_fatal(tiny_model_dir, caplog):
    runner = make_runner(str(tiny_model_dir), SPLIT, "token_mean")
    groups, scores = synthetic_groups(runner.vocab_size)
    long = groups[1][0]
    long.response_ids = np.resize(long.response_ids, runner.max_model_len)  # prompt + response > the context
    long.response_mask = np.ones(runner.max_model_len, np.uint8)
    long.behaviour_logprobs = np.zeros(runner.max_model_len, np.float32)
    with caplog.at_level(logging.ERROR, logger="student_trainer.step"):
        stats = runner.forward_backward(groups, groups, {}, scores, step=0)
    assert stats["dropped_too_long"] == 1 and f"rollout {long.rollout_id!r} has" in caplog.text
    trained = sum(int(r.response_mask.sum()) for g in groups for r in g if r is not long)
    assert stats["tokens"] == trained and np.isfinite(stats["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean"])
def test_a_group_split_across_two_ranks_gives_the_unsplit_one_rank_step(tiny_model_dir, tmp_path, normalization):
    out = tmp_path / "two.pt"
    run_torchrun(
        2,
        "tests.fixtures.split_step",
        str(tiny_model_dir),
        str(out),
        str(SPLIT),
        normalization,
        log_dir=tmp_path / "ranks",
        timeout_s=240,
    )
    two = torch.load(out, weights_only=False)
    assert min(two["micro_batches"]) >= 2  # both ranks got parts of the cut group
    want_stats, want_grads, _ = step_gradients(str(tiny_model_dir), UNSPLIT, normalization)
    assert_same_step((two["stats"], two["grads"]), (want_stats, want_grads))
