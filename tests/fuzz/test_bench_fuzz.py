"""`opd bench fuzz --quick` through the CLI: a row per target with its case count and per-status counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_fuzz_quick_counts_cases_and_statuses_per_target(tmp_path):
    env = {**os.environ, "OPD_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "opd", "bench", "fuzz", "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    out = proc.stdout
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)), m.group(4), m.group(5))
        for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+(yes|NO)\s+[\d.]+  (.*)$", out, re.M)
    }
    assert set(rows) == {"score", "stream", "generate", "raw", "http", "records"}, out + proc.stderr[-3000:]
    for name, (cases, violations, serving, statuses) in rows.items():
        counts = {k: int(v) for k, v in re.findall(r"([\w ()]+?) (\d+)(?:, |$)", statuses)}
        assert cases == 30 and serving == "yes", (name, out)
        assert counts.get("VIOLATION", 0) == violations, (name, statuses)
        per_case = {"stream": (1, 6), "records": (3, 3)}.get(name, (1, 1))  # statuses per case
        assert per_case[0] * cases <= sum(counts.values()) <= per_case[1] * cases, (name, statuses)
    total = re.search(r"^total\s+(\d+)\s+(\d+)$", out, re.M)
    assert int(total.group(1)) == 180 and int(total.group(2)) == sum(r[1] for r in rows.values()), out
    assert proc.returncode == (1 if int(total.group(2)) else 0), out + proc.stderr[-3000:]
