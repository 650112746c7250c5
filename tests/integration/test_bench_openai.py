"""`opd bench openai --quick` through the `opd` CLI: both protocols measured against one teacher, a ratio per
setting, and the wire-bytes table (the numbers themselves belong in BENCHMARKS.md)."""

from __future__ import annotations

import re

import pytest

from tests.integration.test_bench_quick import positive, run_bench


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_openai_bench_prints_both_protocols_and_the_wire_bytes(tmp_path):
    out = run_bench("openai", cache_dir=tmp_path, timeout_s=380)
    grpc = re.search(r"^gRPC ScoreStream\s+(\S+)\s+(\S+)$", out, re.M)
    http = re.search(r"^OpenAI-compatible /v1/completions\s+(\S+)\s+(\S+)$", out, re.M)
    assert grpc and http, out
    grpc_rate, http_rate, ratio = positive(grpc[1]), positive(http[1]), positive(http[2])
    assert ratio == pytest.approx(http_rate / grpc_rate, abs=0.005 + 0.5 * (1 + ratio) / grpc_rate)
    rows = {int(m[1]): m for m in re.finditer(r"^\s+(\d+)\s+([\d.]+) \([\d.]+\)\s+([\d.]+) \([\d.]+\)\s+([\d.]+) "
                                              r"\([\d.]+\)\s+(\S+)$", out, re.M)}  # fmt: skip
    assert set(rows) == {0, 20, 64}, out
    for k, row in rows.items():
        f32, bf16, json_ = positive(row[2]), positive(row[3]), positive(row[4])
        assert bf16 <= f32 < json_, (k, out)  # JSON spells out every number; 16-bit floats halve the log-probs
