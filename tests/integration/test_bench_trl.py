"""`opd bench trl --quick` through the `opd` CLI: opd's pipeline and TRL's DistillationTrainer (in its own venv)
on the tiny random pair, both scored by `opd eval`, with a row per figure and a column per side.

TRL is not a dependency of opd: the bench installs it into a venv of its own on first use (`--trl-venv`, here the
user's cache so that it is installed once). Where that venv cannot be installed (no `python3.11`, no package
index), the bench exits with code 3 and the test is skipped with the bench's reason. The figures are not
asserted against targets (timings belong in BENCHMARKS.md); what is checked is that both sides trained the same
number of samples, that every figure is a number in its range, and that the table has every row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = (
    "wall time",
    "training span",
    "steps / trained samples",
    "trained tokens/s",
    "trained samples/s",
    "held-out divergence",
    "held-out task score",
    "time to the common training divergence",
    "load average",
)


def test_trl_bench_trains_both_sides_on_one_recipe_and_scores_both_with_opd_eval(tmp_path):
    venv = Path(os.environ.get("OPD_TRL_VENV", Path.home() / ".cache" / "opd" / "trl-venv"))
    out_file = tmp_path / "trl.json"
    env = dict(os.environ, OPD_CACHE_DIR=str(tmp_path / "cache"))  # the tiny models are built here
    proc = subprocess.run(
        [sys.executable, "-m", "opd", "bench", "trl", "--quick", "--trl-venv", str(venv), "--out", str(out_file)],
        capture_output=True,
        text=True,
        timeout=2300,
        cwd=REPO_ROOT,
        env=env,
    )
    if proc.returncode == 3:
        pytest.skip(f"the TRL venv cannot be installed here: {proc.stderr.strip()[-400:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in ROWS:
        assert any(line.startswith(row) for line in proc.stdout.splitlines()), (row, proc.stdout)
    payload = json.loads(out_file.read_text())
    recipe, results = payload["recipe"], payload["results"]
    assert set(results) == {"opd", "trl"}
    wanted = recipe["steps"] * recipe["prompts_per_step"] * recipe["samples"]
    for side in results.values():
        assert side["steps"] == recipe["steps"] and side["trained_samples"] == wanted, side
        assert side["tokens_per_s"] > 0 and side["wall_s"] > 0 and len(side["curve"]) == recipe["steps"], side
        assert 0 <= side["eval"]["pass_at_1"] <= 1, side
        assert math.isfinite(side["eval"]["forward_kl_topk_tail"]) and side["eval"]["forward_kl_topk_tail"] >= 0, side
        assert side["eval"]["prompts"] == recipe["eval_limit"], side
