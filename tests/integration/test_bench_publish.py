"""`opd bench publish` on its default tiny random student, hf worker, both ways of serving the adapter: it runs
to the end and prints one table with full weights, LoRA merged and LoRA through peft, every cell and ratio a
positive finite number (the numbers themselves belong in BENCHMARKS.md, not in a test)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_publish_reports_full_weights_against_each_way_of_serving_the_adapter() -> None:
    args = ["--steps", "1", "--reloads", "1", "--gen-tokens", "2", "--backends", "hf", "--hf-lora", "merged", "peft"]
    proc = subprocess.run(
        [sys.executable, "-m", "opd", "bench", "publish", *args],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "measure",
        "full",
        "lora",
        "full / lora",
        "lora-peft",
        "full / lora-peft",
    ]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    for measure in ("bytes per version", "end of step -> worker's first token (s)", "worker generation (tokens/s)"):
        assert len(rows[measure]) == 5, measure
        for cell in rows[measure]:
            value = float(cell.replace(",", ""))
            assert math.isfinite(value) and value > 0, (measure, cell)
    # the adapter is the same file whichever way a worker serves it
    assert rows["bytes per version"][1] == rows["bytes per version"][3]
