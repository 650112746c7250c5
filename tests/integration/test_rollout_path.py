"""scripts/rollout_path.py: the trainer files one training step runs, measured on a tiny model (real Redis, a real
gRPC teacher, `opd train`'s own loop), so that the count in docs/architecture.md is a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a subprocess running `opd train`'s loop

# Files every training step runs, whatever the config: the loop, the producer, the rollout source, the teacher
# client, the step and its loss, the model, the effects after the step and the report.
CORE = {
    "__main__.py": "run",
    "trainer.py": "Trainer.step",
    "batches.py": "BatchProducer.next",
    "groups/source.py": "RolloutSource.next_groups",
    "score_sources/grpc_teacher.py": "TeacherServiceSource.fetch",
    "step.py": "StepRunner.update",
    "loss/compute.py": "compute_distillation_loss",
    "model.py": "StudentLoss.forward",
    "settlement.py": "Settlement.settle",
    "report.py": "StepReport.build",
}


def test_the_tool_finds_the_step_core_and_leaves_start_up_out(tiny_model_dir, tmp_path):
    out = tmp_path / "path.json"
    proc = subprocess.run(
        [sys.executable, "scripts/rollout_path.py", "--model", str(tiny_model_dir), "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    files = result["files"]
    for path, function in CORE.items():
        assert function in files.get(path, {}), (path, function, sorted(files))
    assert files["__main__.py"]["run"] == 0  # the loop was running when the step began: on the stack, not called
    assert files["trainer.py"]["Trainer.step"] == 1  # exactly one step measured (the warm-up step left out)
    started = {name for functions in files.values() for name in functions}
    assert "Trainer.__init__" not in started and "TrainerRuntime.start" not in started  # start-up left out
    assert f"files: {len(files)} " in proc.stdout
    # the hops: the step hands its batch to the step runner and its effects to the settlement (calls crossing files)
    assert result["hops"]["trainer.py -> step.py"] >= 1 and result["hops"]["trainer.py -> settlement.py"] >= 1
    assert all(" <-> " in pair for pair in result["both_ways"])
