"""The hf backend on CUDA scores like the CPU float32 reference (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.client import TeacherClientSync
from tests.fixtures.teacher import random_sequences, reference_logprobs, start_teacher

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


# bfloat16 logits differ from float32 by ~0.4% of their size (up to ~0.5 nats on this sharp model)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.5)])
def test_hf_backend_on_cuda_matches_cpu_reference(tiny_model_dir, dtype, tol):
    server = start_teacher(tiny_model_dir, "hf", engine={"device": "cuda", "dtype": dtype, "hf_chunk_rows": 16})
    try:
        with TeacherClientSync(server.address) as client:
            assert client.info().dtype == dtype
            for ids in random_sequences(4, 384, min_len=40, max_len=120, seed=7):
                s = client.score(ids, 5, top_k=16)
                ref = reference_logprobs(tiny_model_dir, ids)[4:]
                np.testing.assert_allclose(s.token_logprobs, ref[np.arange(len(ids) - 5), ids[5:]], atol=tol)
                np.testing.assert_allclose(s.topk_logprobs, np.sort(ref, 1)[:, ::-1][:, :16], atol=tol)
                assert (s.topk_ids[:, 0] == ref.argmax(1)).mean() >= 0.9
                total = np.logaddexp.reduce(np.concatenate([s.topk_logprobs, s.tail_logprobs[:, None]], 1), 1)
                np.testing.assert_allclose(total, 0.0, atol=1e-3 if dtype == "bfloat16" else 1e-4)
    finally:
        server.stop()
