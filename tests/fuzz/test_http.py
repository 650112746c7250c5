"""Fuzzing the teacher's ops app from its own OpenAPI document (schemathesis), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.oracles import ops_http as fuzz_http

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ops_schema(fuzz_teacher):
    return fuzz_http.load_schema(fuzz_teacher.ops_url)


def test_the_schema_lists_score_and_every_ops_route(ops_schema):
    paths = {op.ok().path for op in ops_schema.get_all_operations()}
    assert {"/v1/score", "/v1/info", "/metrics", "/healthz", "/readyz"} <= paths, paths


def test_every_operation_answers_without_a_server_error(fuzz_teacher, ops_schema):
    cases = fuzz_http.http_cases(ops_schema)

    @settings(settings.get_profile("opd-fuzz"), max_examples=60)
    @given(st.data())
    def check(data):
        case = data.draw(cases)
        assert fuzz_http.run_http(case, fuzz_teacher.ops_url)[0].startswith("HTTP ")

    check()


@pytest.mark.parametrize(
    "body",
    [
        '{"token_ids": [1, 2, 3], "score_from": 4294967296}',  # past the wire's uint32 (found by the fuzzer)
        '{"token_ids": [1, 2, 3], "score_from": 1, "top_k": 1099511627776}',
        '{"token_ids": [1, 2, 3], "score_from": 1, "request_id": "\\ud800"}',  # a lone surrogate: not UTF-8
    ],
    ids=["score_from-over-uint32", "top_k-over-uint32", "request_id-lone-surrogate"],
)
def test_out_of_range_json_is_refused_naming_the_field_not_a_server_error(fuzz_teacher, body):
    import httpx

    r = httpx.post(f"{fuzz_teacher.ops_url}/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), (r.status_code, r.text)
    field = "score_from" if "4294967296" in body else "top_k" if "top_k" in body else "request_id"
    assert field in r.text, r.text
