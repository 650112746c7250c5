"""Per-token divergences and teacher diagnostics against float64 references, and the student's scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from student_trainer.evaluation import StudentTokenStats, TokenSums, divergences, reply_diagnostics, top1_agreement
from teacher_server.client import TeacherScores

pytestmark = pytest.mark.timeout(120)


def _dist(rng: np.random.Generator, rows: int, vocab: int, scale: float = 3.0) -> np.ndarray:
    z = rng.normal(size=(rows, vocab)) * scale
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def _teacher(q: np.ndarray, ids: np.ndarray, sampled: np.ndarray) -> TeacherScores:
    rows = np.arange(len(q))
    inside = np.take_along_axis(q, ids, 1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - inside.sum(1), 0.0, None))
    return TeacherScores("r", 1, np.log(q[rows, sampled]), ids.astype(np.int32), np.log(inside), tail)


def _student(p: np.ndarray, ids: np.ndarray, sampled: np.ndarray) -> StudentTokenStats:
    rows = np.arange(len(p))
    mask = np.ones_like(p, dtype=bool)
    np.put_along_axis(mask, ids, False, 1)
    with np.errstate(divide="ignore"):
        tail = np.log((p * mask).sum(1))
    return StudentTokenStats(np.log(p[rows, sampled]), np.log(np.take_along_axis(p, ids, 1)), tail, p.argmax(1))


def _reference_bucket_kl(q_row: np.ndarray, p_row: np.ndarray, ids: list[int]) -> float:
    """KL(q || p) over buckets {each id} + {everything else}, written out term by term."""
    q_b = [q_row[i] for i in ids] + [1.0 - sum(q_row[i] for i in ids)]
    p_b = [p_row[i] for i in ids] + [1.0 - sum(p_row[i] for i in ids)]
    return sum(qb * math.log(qb / pb) for qb, pb in zip(q_b, p_b, strict=True) if qb > 0)


def test_divergences_match_a_written_out_reference() -> None:
    rng = np.random.default_rng(0)
    q, p = _dist(rng, 5, 8), _dist(rng, 5, 8)
    ids = np.argsort(-q, axis=1)[:, :3][:, ::-1].copy()  # the teacher's top-3, deliberately in ascending order
    sampled = rng.integers(0, 8, size=5)
    out = divergences(_student(p, ids, sampled), _teacher(q, ids, sampled))
    for r in range(5):
        # both sides in float64: only rounding of a handful of terms separates them
        assert out["forward_kl_topk_tail"][r] == pytest.approx(
            _reference_bucket_kl(q[r], p[r], list(ids[r])), rel=1e-10, abs=1e-12
        )
        assert out["reverse_kl_sampled"][r] == pytest.approx(math.log(p[r, sampled[r]] / q[r, sampled[r]]), abs=1e-12)
        # merging outcomes never raises a KL (data processing): the bucket KL is at most the full one
        assert out["forward_kl_topk_tail"][r] <= float((q[r] * np.log(q[r] / p[r])).sum()) + 1e-12
    assert np.array_equal(out["top1_agreement"], p.argmax(1) == q.argmax(1))


def test_identical_distributions_have_zero_divergence_and_full_agreement() -> None:
    rng = np.random.default_rng(1)
    q = _dist(rng, 6, 10)
    ids = np.argsort(-q, axis=1)[:, :4]
    sampled = rng.integers(0, 10, size=6)
    out = divergences(_student(q, ids, sampled), _teacher(q, ids, sampled))
    assert np.abs(out["forward_kl_topk_tail"]).max() < 1e-14
    assert np.abs(out["reverse_kl_sampled"]).max() == 0.0
    assert out["top1_agreement"].all()


def test_teacher_entropy_over_k_plus_one_is_a_lower_bound_and_exact_when_the_tail_is_one_token() -> None:
    rng = np.random.default_rng(2)
    q = _dist(rng, 4, 7)
    sampled = q.argmax(1)
    full = -(q * np.log(q)).sum(1)
    for k in (1, 3, 6):
        ids = np.argsort(-q, axis=1)[:, :k]
        diag = reply_diagnostics(sampled, _teacher(q, ids, sampled))
        assert (diag["teacher_entropy_topk_tail"] <= full + 1e-12).all()
        assert (diag["teacher_entropy_topk_tail"] <= math.log(k + 1) + 1e-12).all()
        if k == 6:  # the tail bucket is a single token: nothing is merged
            np.testing.assert_allclose(diag["teacher_entropy_topk_tail"], full, rtol=1e-12)
    np.testing.assert_allclose(diag["teacher_p_sampled"], q.max(1), rtol=1e-12)
    assert diag["sampled_in_teacher_topk"].all()


def test_an_empty_teacher_tail_keeps_every_value_finite() -> None:
    rng = np.random.default_rng(3)
    q, p = _dist(rng, 3, 4), _dist(rng, 3, 4)
    ids = np.tile(np.arange(4), (3, 1))  # top-k covers the vocabulary: tail log-mass -inf on both sides
    sampled = np.array([0, 1, 2])
    out = {
        **divergences(_student(p, ids, sampled), _teacher(q, ids, sampled)),
        **reply_diagnostics(sampled, _teacher(q, ids, sampled)),
    }
    assert all(np.isfinite(v.astype(float)).all() for v in out.values())
    np.testing.assert_allclose(out["forward_kl_topk_tail"], (q * np.log(q / p)).sum(1), rtol=1e-10)


def test_k_zero_gives_only_the_sampled_token_metrics() -> None:
    q = np.array([[0.5, 0.25, 0.25]])
    empty = np.zeros((1, 0), np.int64)
    out = {
        **divergences(_student(q, empty, np.array([1])), _teacher(q, empty, np.array([1]))),
        **reply_diagnostics(np.array([1]), _teacher(q, empty, np.array([1]))),
    }
    assert set(out) == {"reverse_kl_sampled", "teacher_p_sampled"}
    assert out["teacher_p_sampled"][0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="k >= 1"):
        top1_agreement(np.array([0]), empty, np.zeros((1, 0)))


def test_top1_agreement_reads_the_teachers_best_not_its_first_column() -> None:
    ids = np.array([[4, 7], [2, 3]])
    logprobs = np.log(np.array([[0.1, 0.6], [0.5, 0.2]]))
    assert top1_agreement(np.array([7, 2]), ids, logprobs).tolist() == [True, True]
    assert top1_agreement(np.array([4, 3]), ids, logprobs).tolist() == [False, False]


def test_token_means_weigh_every_token_the_same() -> None:
    means = TokenSums()
    first = means.add_all({"x": np.array([1.0, 1.0, 1.0])})
    means.add_all({"x": np.array([5.0])})
    means.add_all({"x": np.array([])})
    assert first == {"x": 1.0}
    assert means.means()["x"] == pytest.approx(2.0) and means.tokens == 4


def test_student_scorer_matches_a_full_forward(tiny_model_dir, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import opd_apps.eval.student as eval_student

    monkeypatch.setattr(eval_student, "CHUNK_POSITIONS", 3)  # several chunks over 8 positions
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    scorer = eval_student.StudentScorer(model)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.config.vocab_size, size=13)
    start = 5
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0, start - 1 : -1].double(), -1).numpy()
    topk = np.argsort(-ref, axis=1)[:, :4]
    stats = scorer.score(ids, start, topk)
    # float32 logits of magnitude ~30 after a 128-wide dot product: rounding ~1e-5; the chunked lm-head only
    # changes the GEMM's shape, not the arithmetic
    np.testing.assert_allclose(stats.token_logprobs, ref[np.arange(8), ids[start:]], atol=1e-4)
    np.testing.assert_allclose(stats.topk_logprobs, np.take_along_axis(ref, topk, 1), atol=1e-4)
    tail = np.log(1.0 - np.exp(np.take_along_axis(ref, topk, 1)).sum(1))
    np.testing.assert_allclose(stats.tail_logprobs, tail, atol=1e-4)
    assert np.array_equal(stats.argmax_ids, ref.argmax(1))
    empty = scorer.score(ids, len(ids))
    assert empty.token_logprobs.shape == (0,) and empty.topk_logprobs.shape == (0, 0)
    with pytest.raises(ValueError, match="score_from"):
        scorer.score(ids, 0)
