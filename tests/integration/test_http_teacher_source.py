"""The trainer with an `http(s)://` teacher: scores through vLLM's OpenAI API (here opd's own
`--openai-port`; tests/integration/test_openai_compat.py runs the same against vLLM's server).

The HTTP source's scores must be the gRPC service's: the actual token's and the top-k log-probs travel as
float32 values either way (within EPS = 1e-5: the two requests run in different batches, whose float32 sums
differ by ~1e-6), while the HTTP tail mass is 1 - sum exp(top-k) computed from those values, against the
service's exact tail: a log-prob off by at most EPS moves the top-k mass by at most EPS * sum_i p_i, plus the
float32 rounding of the exact tail itself (2^-23 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

from opd.loop_thread import LoopThread
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer.config import TrainerConfig
from student_trainer.score_sources.base import TeacherMismatch
from student_trainer.score_sources.http_teacher import HttpTeacherSource
from teacher_server.client import TeacherClientSync
from tests.fixtures.rollout import make_rollout
from tests.fixtures.teacher import start_teacher
from tests.fixtures.trainer_runtime import push_rollouts, train_steps, trainer_config

pytestmark = pytest.mark.timeout(300)
EPS = 1e-5


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    server = start_teacher(tiny_model_dir, "hf", openai={"host": "127.0.0.1", "port": 0})
    yield server
    server.stop()


@pytest.fixture
def io():
    loop = LoopThread("test-http-io")
    yield loop
    loop.stop()


def http_config(base: TrainerConfig, url: str, tokenizer, **teacher) -> TrainerConfig:
    endpoint = {"addresses": [url], "tokenizer": str(tokenizer), **teacher}
    return TrainerConfig.model_validate({**base.model_dump(), "teacher": endpoint})


def assert_scores_match(http, grpc, eps: float = EPS) -> None:
    assert http.topk_ids.tolist() == grpc.topk_ids.tolist()
    np.testing.assert_allclose(http.token_logprobs, grpc.token_logprobs, rtol=0, atol=eps)
    np.testing.assert_allclose(http.topk_logprobs, grpc.topk_logprobs, rtol=0, atol=eps)
    top_mass = np.exp(grpc.topk_logprobs.astype(np.float64)).sum(1)
    bound = eps * top_mass + np.exp(grpc.tail_logprobs.astype(np.float64)) * 2.0**-23 + 1e-12
    assert np.all(np.abs(np.exp(http.tail_logprobs.astype(np.float64)) - np.exp(grpc.tail_logprobs)) <= bound)


def test_scores_over_http_are_the_grpc_services(teacher, tiny_model_dir, redis_url, namespace, tmp_path, io):
    base = trainer_config(tiny_model_dir, teacher.address, redis_url, namespace, tmp_path)
    config = http_config(base, teacher.openai_url, tiny_model_dir, top_k=8)
    source = HttpTeacherSource(config, config.teacher, io)
    try:
        from transformers import AutoTokenizer

        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
        source.check(fingerprint, 384, str(tiny_model_dir))
        assert source.info.model_name == str(tiny_model_dir) and source.info.vocab_size == 384
        records = [make_rollout(i, num_tokens=6 + i, prompt_id=f"h{i}") for i in range(3)]
        scores = source.fetch(records).result(60)
    finally:
        source.close()
    with TeacherClientSync(teacher.address) as client:
        for r in records:
            ids = np.concatenate([r.prompt_ids, r.response_ids])
            assert_scores_match(scores[r.rollout_id], client.score(ids, len(r.prompt_ids), top_k=8))


def test_training_steps_against_an_http_teacher(teacher, tiny_llama_dir, redis_url, namespace, tmp_path, io):
    base = trainer_config(tiny_llama_dir, teacher.address, redis_url, namespace, tmp_path, max_steps=2)
    config = http_config(base, teacher.openai_url.removesuffix("/v1"), tiny_llama_dir, top_k=4)
    push_rollouts(io, redis_url, namespace, [make_rollout(i, prompt_id=f"g{i}") for i in range(2)])
    assert all(np.isfinite(train_steps(config, io, 2)))


def test_start_up_refuses_what_the_server_or_the_tokenizer_cannot_serve(teacher, tiny_model_dir, tmp_path, io):
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_models import build_tokenizer

    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    base = trainer_config(tiny_model_dir, teacher.address, "redis://127.0.0.1:1", "ns", tmp_path)
    config = http_config(base, teacher.openai_url, tiny_model_dir, top_k=65)
    source = HttpTeacherSource(config, config.teacher, io)
    try:
        with pytest.raises(TeacherMismatch, match="--max-logprobs >= 65"):  # this teacher serves max_top_k=64
            source.check(fingerprint, 384, "student")
    finally:
        source.close()
    other = tmp_path / "other-tokenizer"
    build_tokenizer(vocab_size=300).save_pretrained(other)
    config = http_config(base, teacher.openai_url, other, top_k=2)
    source = HttpTeacherSource(config, config.teacher, io)
    try:
        with pytest.raises(TeacherMismatch, match="tokenizer mismatch"):
            source.check(fingerprint, 384, "student")
    finally:
        source.close()
