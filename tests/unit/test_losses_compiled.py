"""The compiled block math (`loss.compile`) against the float64 reference, and its fallback to the eager path.

The test session disables torch.compile (TORCH_COMPILE_DISABLE in tests/conftest.py), so the compiled path
runs in a subprocess without it: inductor's CPU backend, float64, the same reference and tolerance as the
eager path in test_losses.py (TOL64: float64 chunked vs float64 reference). On CUDA, tests/gpu covers it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student_trainer.loss import block_math
from student_trainer.loss.config import LossConfig
from tests.unit.test_losses import TOL64, assert_matches, chunked_loss, make_batch, reference_loss

REPO_ROOT = Path(__file__).resolve().parents[2]

COMPILED_CHECK = """
import json, torch
from student_trainer.loss.config import LossConfig
from tests.unit.test_losses import make_batch, chunked_loss, reference_loss
errors = {}
for divergence, support in [("rkl", "full"), ("jsd", "topk"), ("fkl_to_rkl", "full"), ("rkl_sampled", "topk")]:
    hidden, weight, bias, inputs, teacher = make_batch(seed=3)
    cfg = LossConfig(divergence=divergence, support=support, chunk_size=5, block_budget_mib=1e-4, compile="on")
    got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    want = reference_loss(hidden, weight, bias, inputs, teacher, cfg)
    errors[f"{divergence}/{support}"] = [
        [float((g.double() - r).abs().max()), float(r.abs().max())] for g, r in zip(got[:4], want)
    ]
print("ERRORS " + json.dumps(errors))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_compiled_block_math_matches_the_float64_reference():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1100
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the eager path" not in proc.stderr, proc.stderr[-3000:]  # it really ran compiled
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ERRORS "))
    for variant, parts in json.loads(line[len("ERRORS ") :]).items():
        for name, (error, scale) in zip(("loss", "d hidden", "d weight", "d bias"), parts, strict=False):
            assert error <= TOL64["atol"] + TOL64["rtol"] * scale, (variant, name, error, scale)


def test_a_failing_compiled_function_falls_back_to_the_exact_eager_path(monkeypatch, caplog):
    hidden, weight, bias, inputs, teacher = make_batch(seed=4)
    cfg = LossConfig(divergence="jsd", support="full", chunk_size=5, compile="on")
    fn = block_math.BlockFunction(block_math.BlockSettings.of(cfg), compiled=True)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler")

    fn._compiled = broken
    monkeypatch.setattr(block_math, "block_function", lambda settings, compiled: fn)
    monkeypatch.setattr("student_trainer.loss.compute.block_function", lambda settings, compiled: fn)
    with caplog.at_level(logging.WARNING, logger="student_trainer.loss.block_math"):
        got = chunked_loss(hidden, weight, bias, inputs, teacher, cfg)
    assert "using the eager path" in caplog.text and not fn.compiled
    assert_matches(got[:4], reference_loss(hidden, weight, bias, inputs, teacher, cfg), **TOL64)


def test_compile_auto_means_cuda_only():
    assert block_math.wants_compile("auto", torch.device("cuda")) and not block_math.wants_compile(
        "auto", torch.device("cpu")
    )
    assert block_math.wants_compile("on", torch.device("cpu")) and not block_math.wants_compile(
        "off", torch.device("cuda")
    )
