"""`opd eval`'s student scorer on CUDA reads the same log-probs as a CPU float64 forward (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _reference(model_dir, ids: np.ndarray, start: int) -> np.ndarray:
    """log_softmax of a CPU float64 forward; row p = distribution of token start + p. [P, V]"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)[None]).logits[0, start - 1 : -1]
    return torch.log_softmax(logits, -1).numpy()


# bfloat16 logits differ from float32 by ~0.4% of their size (up to ~0.5 nats on this sharp tiny model);
# float32 on CUDA (no TF32 by default) rounds like the CPU to ~1e-5
@pytest.mark.parametrize(("dtype", "tol", "agree"), [("float32", 1e-4, 1.0), ("bfloat16", 0.5, 0.9)])
def test_student_scorer_on_cuda_matches_a_cpu_reference(tiny_model_dir, monkeypatch, dtype, tol, agree):
    import opd_apps.eval.student as eval_student

    monkeypatch.setattr(eval_student, "CHUNK_POSITIONS", 16)  # several chunks per sequence
    scorer = eval_student.StudentScorer.load(tiny_model_dir, device="cuda", dtype=dtype)
    assert scorer.device.type == "cuda"
    rng = np.random.default_rng(11)
    for length in (40, 97):
        ids = rng.integers(0, 384, size=length)
        start = 7
        ref = _reference(tiny_model_dir, ids, start)
        topk = np.argsort(-ref, axis=1)[:, :8]
        stats = scorer.score(ids, start, topk)
        rows = np.arange(length - start)
        np.testing.assert_allclose(stats.token_logprobs, ref[rows, ids[start:]], atol=tol)
        np.testing.assert_allclose(stats.topk_logprobs, np.take_along_axis(ref, topk, 1), atol=tol)
        tail = np.log1p(-np.exp(np.take_along_axis(ref, topk, 1)).sum(1))
        np.testing.assert_allclose(stats.tail_logprobs, tail, atol=tol)
        assert (stats.argmax_ids == ref.argmax(1)).mean() >= agree
