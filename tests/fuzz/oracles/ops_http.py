"""Schema-driven fuzzing of a live ops app (`/v1/score` and every other route) with `schemathesis`.

Cases come from the app's own OpenAPI document, so a route added later is
fuzzed without a change here; both schema-conforming (positive) and
violating (negative) requests are generated and sent over real HTTP to the
server on 127.0.0.1. Oracle: never a 5xx; the JSON routes answer JSON, and a
refusal says what is wrong (`error.message` from opd, `detail` from FastAPI's
request validation). Starts no server.
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fuzz.oracles.teacher_rpcs import FuzzViolation


def load_schema(ops_url: str):
    """The live app's OpenAPI document as a schemathesis schema, its requests sent to `ops_url`."""
    return schemathesis.openapi.from_url(f"{ops_url}/openapi.json")


def http_cases(schema) -> st.SearchStrategy:
    """Cases of every operation in the document, positive and negative."""
    operations = [result.ok() for result in schema.get_all_operations()]
    if not operations:
        raise ValueError("the OpenAPI document lists no operations")
    return st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])


def run_http(case, ops_url: str) -> list[str]:
    response = case.call(base_url=ops_url, timeout=60)
    status, path = response.status_code, case.operation.path
    what = f"{case.method} {path} ({case.as_curl_command()[:300]})"
    if status >= 500:
        raise FuzzViolation(f"{what} answered HTTP {status}: {response.text[:300]}")
    if path.startswith("/v1/"):
        try:
            body = json.loads(response.text)
        except ValueError:
            raise FuzzViolation(f"{what} answered HTTP {status} with a body that is not JSON") from None
        if status >= 400 and not (
            isinstance(body, dict) and (body.get("detail") or body.get("error", {}).get("message"))
        ):
            raise FuzzViolation(f"{what} refused with HTTP {status} but no message: {response.text[:300]}")
    return [f"HTTP {status}"]
