"""`opd bench pipeline --quick` through the `opd` CLI: Redis, a teacher, a worker and the trainer as processes,
under both admission rules, to the end, with a row per figure and a column per rule.

The figures are not asserted against targets (timings belong in BENCHMARKS.md); what is checked is that every run
trained its steps, that each figure is a number in its range, and that the printed table has every row.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_bench_quick import run_bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROWS = (
    "trained samples/s",
    "stale-dropped share",
    "empty steps",
    "prompts fed again",
    "trainer data-wait share",
    "trainer teacher-wait share",
    "worker idle share",
    "weight load per version (s)",
    "mean staleness of trained (versions)",
)


def test_pipeline_bench_runs_both_admission_rules_and_reports_every_figure(tmp_path):
    out_file = tmp_path / "pipeline.json"
    out = run_bench("pipeline", "--out", str(out_file), cache_dir=tmp_path / "cache", timeout_s=850)
    for row in ROWS:
        assert any(line.startswith(row) for line in out.splitlines()), (row, out)
    result = json.loads(out_file.read_text())
    assert set(result["runs"]) == {"version", "inflight"}
    for runs in result["runs"].values():
        (run,) = runs  # --quick: one repeat
        assert run["steps"] == 4 and run["trained"] > 0, run
        for share in ("stale_share", "data_wait_share", "teacher_wait_share", "worker_idle_share"):
            assert 0 <= run[share] <= 1, (share, run)
        assert run["trained_per_s"] > 0 and run["weight_load_s"] > 0 and run["empty_steps"] >= 0, run
        assert 0 <= run["mean_staleness"] <= result["settings"]["max_staleness"], run  # trained within the bound
        assert all(math.isfinite(v) for v in result["medians"][run["admission"]].values())
