"""opd's OpenAI-compatible teacher port against vLLM's own OpenAI server, field by field, on the same model.

Both servers run the tiny float32 model (opd on the hf backend, vLLM's server as a subprocess of the CPU
build) and are driven with the `openai` Python client. Every field of the JSON answer must match except
the per-response `id`, `created` and `system_fingerprint`; token ids, ranks, strings and finish reasons
exactly, log-probs within 1e-4 (two float32 forwards of the same weights through different kernels differ
by a few 1e-6 at log-probs of magnitude <= 25: float32 rounding of ~1e-7 relative, summed over the
vocabulary's log-sum-exp and the layers). Generation is compared under greedy sampling (temperature 0),
the only setting where both must pick the same tokens.
"""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from tests.fixtures.teacher import start_teacher
from tests.fixtures.vllm_openai import vllm_openai_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOLERANCE = 1e-4
PER_RESPONSE = {"id", "created", "system_fingerprint"}


@pytest.fixture(scope="module")
def vllm_url(tiny_model_dir, tmp_path_factory):
    with vllm_openai_server(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def opd_url(tiny_model_dir):
    server = start_teacher(tiny_model_dir, "hf", openai={"host": "127.0.0.1", "port": 0})
    yield server.openai_url
    server.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)


def _raw(url: str, **request) -> dict:
    response = _client(url).completions.with_raw_response.create(**request)
    return response.http_response.json()


def assert_same(ours, theirs, path: str = "$") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != vLLM's {list(theirs)}"
        for key in theirs:
            if path == "$" and key in PER_RESPONSE:
                continue
            assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{path}: {ours!r} != vLLM's {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        assert isinstance(ours, float | int) and math.isclose(ours, theirs, rel_tol=0, abs_tol=TOLERANCE), (
            f"{path}: {ours!r} != vLLM's {theirs!r}"
        )
    else:
        assert ours == theirs and type(ours) is type(theirs), f"{path}: {ours!r} != vLLM's {theirs!r}"


SENTENCES = [
    "What is 12 + 30? The answer is 42. Please put the final answer in \\boxed{}.",
    "Distillation trains a small student to match a large teacher.",
    "user: hello there\nassistant: hi, how can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.",
    "<|im_start|>user\nWhat is 2*3?<|im_end|>\n<|im_start|>assistant\n",
    "Please reason step by step.",
]


def _ids_of(tokenizer):
    def ids(i: int, n: int = 1, length: int = 24) -> list[list[int]]:
        """Token ids of corpus text (valid UTF-8: vLLM's detokenizer garbles text after invalid byte sequences)."""
        return [tokenizer.encode(SENTENCES[(i + j) % len(SENTENCES)])[:length] for j in range(n)]

    return ids


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    from transformers import AutoTokenizer

    return _ids_of(AutoTokenizer.from_pretrained(tiny_model_dir))


CASES = {  # name -> request, given ids(i, n, length): n prompts of corpus text as token ids
    "prompt_logprobs on token ids (TRL-style scoring)":
        lambda ids: dict(prompt=ids(0)[0], max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 20}),
    "prompt_logprobs 0: the actual token and its rank":
        lambda ids: dict(prompt=ids(1)[0], max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 0}),
    "several prompts as lists of ids":
        lambda ids: dict(prompt=ids(2, 3, 9), max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 3}),
    "text prompt, echo + logprobs, no generation (harness log-likelihood)":
        lambda ids: dict(prompt="The quick brown fox jumps over the lazy dog.", max_tokens=0, echo=True, logprobs=5),
    "echo + logprobs with greedy generation":
        lambda ids: dict(prompt=ids(3, 2, 7), max_tokens=3, echo=True, logprobs=2, temperature=0.0),
    "generated tokens' logprobs":
        lambda ids: dict(prompt=ids(4)[0], max_tokens=6, logprobs=4, temperature=0.0),
    "token ids returned, tokens as ids":
        lambda ids: dict(prompt=ids(5)[0][:10], max_tokens=2, echo=True, logprobs=1, temperature=0.0,
                         extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True}),
    "ms-swift GKD teacher request (teacher_model_server)":
        lambda ids: dict(prompt=ids(6)[0], max_tokens=0, temperature=0.0, logprobs=20, echo=True),
    "more prompt log-probs than legacy ones":
        lambda ids: dict(prompt="What is 12 + 30? The answer is 42.", max_tokens=0, echo=True, logprobs=1,
                         extra_body={"prompt_logprobs": 6}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_completions_match_vllm_field_by_field(name, ids, vllm_url, opd_url, tiny_model_dir):
    request = {"model": str(tiny_model_dir), **CASES[name](ids)}
    ours, theirs = _raw(opd_url, **request), _raw(vllm_url, **request)
    if request["max_tokens"] == 0:  # vLLM counts the token it generates and discards; opd generates none
        assert (ours["usage"]["completion_tokens"], theirs["usage"]["completion_tokens"]) == (0, 1)
        ours["usage"] = {**ours["usage"], "completion_tokens": 1, "total_tokens": ours["usage"]["total_tokens"] + 1}
    assert_same(ours, theirs)
    assert any(c["prompt_logprobs"] or c["logprobs"] for c in ours["choices"])  # the comparison compared numbers


def test_the_openai_client_reads_both_servers_alike(ids, vllm_url, opd_url, tiny_model_dir):
    ids = ids(6)[0]
    answers = []
    for url in (opd_url, vllm_url):
        client = _client(url)
        model = client.models.list().data[0].id  # how TRL and ms-swift find the served model
        completion = client.completions.create(
            model=model, prompt=ids, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 5}
        )
        prompt_logprobs = completion.choices[0].model_extra["prompt_logprobs"]
        answers.append((model, [None if p is None else {int(t): v["logprob"] for t, v in p.items()}
                                for p in prompt_logprobs]))  # fmt: skip
    (our_model, ours), (their_model, theirs) = answers
    assert our_model == their_model == str(tiny_model_dir)
    assert ours[0] is None and theirs[0] is None and len(ours) == len(ids)
    for mine, ref in zip(ours[1:], theirs[1:], strict=True):
        assert mine.keys() == ref.keys()
        assert np.allclose([mine[t] for t in ref], list(ref.values()), rtol=0, atol=TOLERANCE)


def test_models_match(vllm_url, opd_url):
    ours = _client(opd_url).models.with_raw_response.list().http_response.json()
    theirs = _client(vllm_url).models.with_raw_response.list().http_response.json()
    for answer in (ours, theirs):
        for model in answer["data"]:
            for key in ("created", "owned_by"):
                model.pop(key)
            for perm in model["permission"]:
                perm.pop("id"), perm.pop("created")
    assert ours == theirs


@pytest.mark.parametrize("field", ["prompt_logprobs", "logprobs"])
def test_both_refuse_more_logprobs_than_they_serve(field, vllm_url, opd_url, tiny_model_dir):
    for url in (opd_url, vllm_url):  # opd: engine.max_top_k=64; vLLM: --max-logprobs 64
        with pytest.raises(openai.BadRequestError) as err:
            _client(url).completions.create(
                model=str(tiny_model_dir), prompt=[1, 2, 3], max_tokens=1, extra_body={field: 65}
            )
        assert "64" in str(err.value)


def test_the_trainer_scores_and_trains_against_vllms_own_server(
    vllm_url, tiny_model_dir, tiny_llama_dir, hf_teacher, redis_url, namespace, tmp_path
):
    """An `http(s)://` teacher address: vLLM's server scores as opd's teacher does, and training steps run."""
    from transformers import AutoTokenizer

    from opd.loop_thread import LoopThread
    from protos.tokenizer_fingerprint import tokenizer_fingerprint
    from student_trainer.score_sources.http_teacher import HttpTeacherSource
    from teacher_server.client import TeacherClientSync
    from tests.fixtures.rollout import make_rollout
    from tests.fixtures.trainer_runtime import push_rollouts, train_steps, trainer_config
    from tests.integration.test_http_teacher_source import assert_scores_match, http_config

    io = LoopThread("test-vllm-http-io")
    try:
        base = trainer_config(tiny_llama_dir, hf_teacher.address, redis_url, namespace, tmp_path, max_steps=2)
        config = http_config(base, vllm_url.removesuffix("/v1"), tiny_model_dir, top_k=5)
        records = [make_rollout(i, num_tokens=6 + i, prompt_id=f"v{i}") for i in range(2)]
        source = HttpTeacherSource(config, config.teacher, io)
        try:
            source.check(tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_llama_dir)), 384, "student")
            scores = source.fetch(records).result(120)
        finally:
            source.close()
        with TeacherClientSync(hf_teacher.address) as client:
            for r in records:
                grpc = client.score(np.concatenate([r.prompt_ids, r.response_ids]), len(r.prompt_ids), top_k=5)
                assert_scores_match(scores[r.rollout_id], grpc, eps=TOLERANCE)  # two engines: see the docstring
        push_rollouts(io, redis_url, namespace, records)
        assert all(np.isfinite(train_steps(config, io, 2)))
    finally:
        io.stop()
