"""The teacher's OpenAI-compatible port on its own: exact teacher temperature, the gRPC service's auth,
metrics and validation, the Generate path, TLS, and clear refusals of what it does not serve.

(The field-by-field comparison with vLLM's own server is tests/integration/test_openai_compat.py.)
"""

from __future__ import annotations

import ssl

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.client import TeacherClientSync
from tests.fixtures.teacher import reference_logprobs, start_teacher
from tests.fixtures.tls import TestCA

pytestmark = pytest.mark.timeout(180)
IDS = [5, 17, 33, 99, 120, 7, 250, 31, 64, 300, 12, 8]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    server = start_teacher(tiny_model_dir, "hf", openai={"host": "127.0.0.1", "port": 0}, served_name="tiny")
    yield server
    server.stop()


def _client(url: str, key: str = "EMPTY", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60, **kwargs)


def _samples(ops_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{ops_url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prompt_logprobs_are_the_teachers_at_the_requested_temperature(teacher, tiny_model_dir):
    for temperature in (1.0, 0.5):
        completion = _client(teacher.openai_url).completions.create(
            model="tiny", prompt=IDS, max_tokens=0, temperature=temperature, extra_body={"prompt_logprobs": 5}
        )
        positions = completion.choices[0].model_extra["prompt_logprobs"]
        reference = reference_logprobs(tiny_model_dir, np.asarray(IDS), temperature)  # float64, row p: token p+1
        assert positions[0] is None and len(positions) == len(IDS)
        for p in range(1, len(IDS)):
            ref = reference[p - 1]
            entries = {int(t): v for t, v in positions[p].items()}
            actual = entries[IDS[p]]
            # float32 forward vs the float64 reference: ~1e-5 at these magnitudes
            assert actual["logprob"] == pytest.approx(ref[IDS[p]], abs=1e-4)
            # the rank counts tokens at least as likely; a float32 near-tie may move it by those within 1e-4
            lo, hi = int((ref > ref[IDS[p]] + 1e-4).sum()) + 1, int((ref >= ref[IDS[p]] - 1e-4).sum())
            assert lo <= actual["rank"] <= hi
            top5 = [t for t in entries if entries[t]["rank"] <= 5 and (t != IDS[p] or actual["rank"] <= 5)]
            assert sorted(top5, key=lambda t: entries[t]["rank"]) == list(np.argsort(-ref)[:5])
            assert [entries[t]["logprob"] for t in top5] == pytest.approx(sorted(ref, reverse=True)[:5], abs=1e-4)


def test_generation_goes_through_the_generate_path(teacher):
    with TeacherClientSync(teacher.address) as grpc_client:
        expected = grpc_client.generate(IDS, max_tokens=5, temperature=0.0).token_ids.tolist()
    completion = _client(teacher.openai_url).completions.create(
        model="tiny", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=2, extra_body={"return_token_ids": True}
    )
    choice = completion.choices[0]
    assert choice.model_extra["token_ids"] == expected
    assert len(choice.logprobs.token_logprobs) == 5 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert completion.usage.completion_tokens == 5 and completion.usage.prompt_tokens == len(IDS)


def test_refusals_name_the_field(teacher):
    url = f"{teacher.openai_url}/completions"
    cases = {
        "`n`": {"n": 2},
        "`stream`": {"stream": True},
        "`logit_bias`": {"logit_bias": {"5": 1.0}},
        "`stop`": {"stop": ["."]},
        "whole vocabulary": {"prompt_logprobs": -1},
        "max_top_k=64": {"prompt_logprobs": 65},
        "outside the vocabulary": {"prompt": [1, 2, 999]},
        "max_model_len": {"prompt": [1] * 600},
        "`max_tokens`": {"max_tokens": -1},
        "prompt 0 is empty": {"prompt": []},
    }
    for needle, override in cases.items():
        response = httpx.post(url, json={"prompt": IDS, "max_tokens": 0, **override}, timeout=30)
        assert response.status_code == 400, (needle, response.text)
        error = response.json()["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400
        assert needle in error["message"], (needle, error["message"])
    response = httpx.post(url, json={"model": "another", "prompt": IDS}, timeout=30)
    assert response.status_code == 404 and "another" in response.json()["error"]["message"]
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400


def test_auth_and_per_client_metrics_are_the_grpc_services(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OPD_TEST_OPENAI_TOKENS", "alice:alice-secret,bob:bob-secret")
    server = start_teacher(
        tiny_model_dir, "hf", openai={"host": "127.0.0.1", "port": 0}, auth={"tokens_env": "OPD_TEST_OPENAI_TOKENS"}
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(server.openai_url, "wrong").completions.create(model=None, prompt=IDS, max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            _client(server.openai_url, "wrong").models.list()
        alice = _client(server.openai_url, "alice-secret")
        alice.completions.create(model=None, prompt=IDS, max_tokens=0, extra_body={"prompt_logprobs": 2})
        alice.completions.create(model=None, prompt=[IDS, IDS[:4]], max_tokens=0, extra_body={"prompt_logprobs": 2})
        _client(server.openai_url, "bob-secret").completions.create(model=None, prompt=IDS[:6], max_tokens=3)
        samples = _samples(server.ops_url)
    finally:
        server.stop()
    ok = (("code", "OK"), ("rpc", "openai_completions"))
    assert samples[("opd_teacher_requests_total", (("client", "alice"), *ok))] == 3  # one per scored prompt
    assert samples[("opd_teacher_scored_tokens_total", (("client", "alice"),))] == 2 * (len(IDS) - 1) + 3
    assert samples[("opd_teacher_generated_tokens_total", (("client", "bob"),))] == 3
    gen = (("client", "bob"), ("code", "OK"), ("rpc", "openai_generate"))
    assert samples[("opd_teacher_requests_total", gen)] == 1
    assert ("opd_teacher_scored_tokens_total", (("client", "bob"),)) not in samples  # no log-probs asked


def test_the_port_is_off_unless_configured_and_serves_tls_like_grpc(tiny_model_dir, hf_teacher, tmp_path):
    assert hf_teacher.server.openai_port is None
    ca = TestCA(tmp_path, "oai")
    cert = ca.server_cert()
    server = start_teacher(
        tiny_model_dir,
        "hf",
        openai={"host": "127.0.0.1", "port": 0},
        grpc={"tls_cert_file": str(cert.cert), "tls_key_file": str(cert.key)},
    )
    try:
        assert server.openai_url.startswith("https://")
        trusting = ssl.create_default_context()
        ca.ca.configure_trust(trusting)
        # (closed before the server stops: a kept-alive TLS connection holds up uvicorn's shutdown)
        with _client(server.openai_url, http_client=httpx.Client(verify=trusting)) as client:
            assert client.models.list().data[0].id == str(tiny_model_dir)
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.openai_url.replace("https://", "http://") + "/models", timeout=10)
    finally:
        server.stop()


@pytest.mark.slow
def test_temperature_is_refused_on_the_vllm_backend(vllm_teacher):
    from teacher_server.config import OpenAIPortConfig
    from teacher_server.openai_api import OpenAIPort

    config = vllm_teacher.server.config.model_copy(update={"openai": OpenAIPortConfig(host="127.0.0.1", port=0)})
    port = OpenAIPort(config, vllm_teacher.server._servicer)
    vllm_teacher.call(port.start())
    try:
        client = _client(f"http://127.0.0.1:{port.port}/v1")
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=None, prompt=IDS, max_tokens=0, temperature=0.5, extra_body={"prompt_logprobs": 2}
            )
        assert "temperature=0.5" in str(err.value) and "backend hf" in str(err.value)
        ok = client.completions.create(model=None, prompt=IDS, max_tokens=0, extra_body={"prompt_logprobs": 2})
        assert len(ok.choices[0].model_extra["prompt_logprobs"]) == len(IDS)
    finally:
        vllm_teacher.call(port.stop())


def test_a_full_queue_is_429_with_a_retry_hint(tiny_model_dir):
    # a prompt of more tokens than the queue may hold is refused at once, every time: QueueFull, not a race
    server = start_teacher(
        tiny_model_dir, "hf", openai={"host": "127.0.0.1", "port": 0}, scheduler={"max_queued_tokens": 4}
    )
    try:
        with pytest.raises(openai.RateLimitError) as err:
            _client(server.openai_url).completions.create(
                model=None, prompt=IDS, max_tokens=0, extra_body={"prompt_logprobs": 1}
            )
        headers = err.value.response.headers
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
        assert "queue is full" in err.value.response.json()["error"]["message"]
    finally:
        server.stop()
