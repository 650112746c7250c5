"""Smoke test of `opd bench losses` (`student_trainer.bench_losses`): it runs
each configuration in a subprocess, prints a ratio line per size, and reports
an allocation past its memory cap as `out of memory` instead of crashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "student_trainer.bench_losses", "--quick", "--losses", "rkl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=REPO_ROOT)


def test_quick_bench_prints_a_ratio_line_per_size():
    proc = run_bench("--v", "4096", "8192", "--methods", "seed", "fused")
    assert proc.returncode == 0, proc.stderr
    ratios = [line for line in proc.stdout.splitlines() if line.startswith("ratio rkl N=256")]
    assert len(ratios) == 2 and all("x less" in line and "cpu" in line for line in ratios), proc.stdout


def test_a_configuration_past_its_memory_cap_reports_out_of_memory():
    proc = run_bench("--v", "8192", "--methods", "full", "--memory-cap-gib", "0.001")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "(a) full logits" in line]
    assert len(rows) == 1 and "out of memory" in rows[0], proc.stdout
