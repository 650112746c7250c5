"""Both backends score like a plain transformers float32 forward (log_softmax), over real gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.client import InvalidArgument, TeacherClientSync
from tests.fixtures.teacher import random_sequences, reference_logprobs

pytestmark = pytest.mark.timeout(300)

TOL = 1e-4


def _check_against_reference(model_dir, ids, score_from, scores, k, temperature=1.0):
    ref = reference_logprobs(model_dir, ids, temperature)[score_from - 1 :]  # [P, V]
    targets = ids[score_from:]
    np.testing.assert_allclose(scores.token_logprobs, ref[np.arange(len(targets)), targets], atol=TOL)
    assert scores.topk_ids.shape == (len(targets), k)
    ref_top = np.sort(ref, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(scores.topk_logprobs, ref_top, atol=TOL)
    # the returned ids carry the returned log-probs under the reference
    np.testing.assert_allclose(
        np.take_along_axis(ref, scores.topk_ids.astype(np.int64), 1), scores.topk_logprobs, atol=TOL
    )
    return ref


def test_token_and_topk_logprobs_match_reference_forward(any_teacher, tiny_model_dir):
    with TeacherClientSync(any_teacher.address) as client:
        for ids in random_sequences(3, 384, seed=1):
            score_from = len(ids) // 2
            scores = client.score(ids, score_from, top_k=20)
            _check_against_reference(tiny_model_dir, ids, score_from, scores, 20)


def test_tail_mass_completes_the_topk_distribution(any_teacher):
    with TeacherClientSync(any_teacher.address) as client:
        ids = random_sequences(1, 384, seed=2)[0]
        for k in (1, 5, 64):
            s = client.score(ids, 1, top_k=k)
            total = np.logaddexp.reduce(np.concatenate([s.topk_logprobs, s.tail_logprobs[:, None]], 1), axis=1)
            np.testing.assert_allclose(total, 0.0, atol=TOL)


def test_top_k_zero_returns_only_the_actual_token(any_teacher, tiny_model_dir):
    with TeacherClientSync(any_teacher.address) as client:
        ids = random_sequences(1, 384, seed=3)[0]
        s = client.score(ids, 3, top_k=0)
        assert s.topk_ids.shape == (len(ids) - 3, 0) and s.topk_logprobs.shape == (len(ids) - 3, 0)
        np.testing.assert_array_equal(s.tail_logprobs, 0.0)  # log(1): nothing is in the top-0
        ref = reference_logprobs(tiny_model_dir, ids)[2:]
        np.testing.assert_allclose(s.token_logprobs, ref[np.arange(len(ids) - 3), ids[3:]], atol=TOL)


def test_full_vocabulary_reply_matches_reference(any_teacher, tiny_model_dir):
    with TeacherClientSync(any_teacher.address) as client:
        ids = random_sequences(1, 384, min_len=10, max_len=12, seed=4)[0]
        s = client.score(ids, 4, top_k=8, full_vocab=True)
        ref = reference_logprobs(tiny_model_dir, ids)[3:]
        assert s.full_logprobs is not None and s.full_logprobs.shape == ref.shape
        np.testing.assert_allclose(s.full_logprobs, ref, atol=TOL)
        rest = np.sort(ref, axis=1)[:, ::-1][:, 8:]
        np.testing.assert_allclose(s.tail_logprobs, np.logaddexp.reduce(rest, axis=1), atol=TOL)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 0.1)])
def test_16_bit_logprobs_on_the_wire(hf_teacher, dtype, tol):
    ids = random_sequences(1, 384, seed=5)[0]
    with (
        TeacherClientSync(hf_teacher.address) as exact,
        TeacherClientSync(hf_teacher.address, logprob_dtype=dtype) as small,
    ):
        a, b = exact.score(ids, 2, top_k=8), small.score(ids, 2, top_k=8)
    assert b.token_logprobs.dtype == np.float32  # widened on receipt
    np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, rtol=tol / 10, atol=tol)
    np.testing.assert_array_equal(b.topk_ids, a.topk_ids)


def test_teacher_temperature_is_exact_on_hf(hf_teacher, tiny_model_dir):
    ids = random_sequences(1, 384, seed=6)[0]
    with TeacherClientSync(hf_teacher.address) as client:
        s = client.score(ids, 5, top_k=10, temperature=0.7)
    _check_against_reference(tiny_model_dir, ids, 5, s, 10, temperature=0.7)


@pytest.mark.slow
def test_teacher_temperature_is_refused_by_vllm(vllm_teacher):
    with TeacherClientSync(vllm_teacher.address) as client:
        assert client.info().supports_temperature is False
        with pytest.raises(InvalidArgument, match="temperature=0.5 is not supported by the vllm backend"):
            client.score([1, 2, 3, 4], 1, temperature=0.5)
        client.score([1, 2, 3, 4], 1, temperature=1.0)  # T = 1 is what vLLM computes: allowed


def test_info_describes_the_engine(any_teacher, tiny_model_dir):
    from transformers import AutoTokenizer

    from protos.tokenizer_fingerprint import tokenizer_fingerprint

    with TeacherClientSync(any_teacher.address) as client:
        info = client.info()
    assert info.vocab_size == 384 and info.max_top_k == 64
    # 512 positions; vLLM keeps one free for the output token it insists on, so it scores at most 511
    assert info.max_model_len == (512 if info.backend == "hf" else 511)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert info.supports_full_vocab is True
    assert info.dtype == "float32"


def test_generate_returns_samples_with_their_teacher_logprobs(any_teacher, tiny_model_dir):
    prompt = np.array([5, 6, 7, 8], dtype=np.int32)
    with TeacherClientSync(any_teacher.address) as client:
        gen = client.generate(prompt, max_tokens=6, temperature=1.0, seed=3)
        greedy = client.generate(prompt, max_tokens=6, temperature=0.0)
    assert len(gen.token_ids) == len(gen.logprobs) and 1 <= len(gen.token_ids) <= 6
    assert gen.finish_reason in ("stop", "length")
    full = np.concatenate([prompt, gen.token_ids])
    ref = reference_logprobs(tiny_model_dir, full)[len(prompt) - 1 :]
    np.testing.assert_allclose(gen.logprobs, ref[np.arange(len(gen.token_ids)), gen.token_ids], atol=1e-3)
    # greedy picks the argmax at each step
    full_greedy = np.concatenate([prompt, greedy.token_ids])
    ref_greedy = reference_logprobs(tiny_model_dir, full_greedy)[len(prompt) - 1 :]
    np.testing.assert_array_equal(greedy.token_ids, ref_greedy.argmax(axis=1)[: len(greedy.token_ids)])
