"""Which weights `opd eval` samples from: an HF directory, `embedded`, or a trainer checkpoint.

A trainer checkpoint (`torch.distributed.checkpoint` shards + `trainer_state.pt`,
or the checkpoint directory holding `step-XXXXXXXX` directories) is turned into
a Hugging Face directory by running `opd export` (`student_trainer.export`) in
a child process, so its one-process gloo group lives and dies there, into
`OUT/model-step-XXXXXXXX`. The checkpoint holds weights only: the run's student
model (`--base-model`) gives the architecture, config and tokenizer.
Does not load the model.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opd.model_source import EMBEDDED, resolve_model_dir

_STEP = re.compile(r"step-(\d+)$")


class EvalError(ValueError):
    """An evaluation input is unusable (model, checkpoint, prompts, teacher); the message says how to fix it."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a Hugging Face directory to load
    source: Literal["hf", "embedded", "checkpoint"]
    checkpoint: str | None = None  # the step directory exported
    step: int | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "source": self.source, "checkpoint": self.checkpoint, "step": self.step}


def checkpoint_step_dir(path: Path) -> Path | None:
    """The step directory when `path` is a trainer checkpoint (or a directory of them), else None."""
    if (path / "trainer_state.pt").is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    from student_trainer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(str(path))
    return latest if latest is not None and (latest / "trainer_state.pt").is_file() else None


def resolve_student(model: str, base_model: str | None, out_dir: Path) -> ResolvedModel:
    """The HF directory to evaluate; exports a checkpoint first. EvalError / ConfigError name the fix."""
    if model == EMBEDDED:
        return ResolvedModel(resolve_model_dir(model), "embedded")
    path = Path(model).expanduser()
    if not path.exists():
        raise EvalError(
            f"--model {model!r} does not exist; pass a Hugging Face model directory, `embedded`, or a trainer "
            f"checkpoint directory"
        )
    step_dir = checkpoint_step_dir(path)
    if step_dir is None:
        return ResolvedModel(resolve_model_dir(model), "hf")
    if base_model is None:
        raise EvalError(
            f"--model {model!r} is a trainer checkpoint, which holds weights only; pass --base-model DIR (the "
            f"run's --model: architecture, config and tokenizer)"
        )
    base = resolve_model_dir(base_model)
    match = _STEP.search(step_dir.name)
    step = int(match.group(1)) if match else None
    target = out_dir / f"model-{step_dir.name}"
    export_checkpoint(step_dir, base, target)
    return ResolvedModel(target, "checkpoint", str(step_dir), step)


def export_checkpoint(step_dir: Path, base_model: Path, target: Path) -> Path:
    """Run `opd export` in a child process; EvalError with its message when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "student_trainer.export",
        "--checkpoint",
        str(step_dir),
        "--model",
        str(base_model),
        "--out",
        str(target),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise EvalError(
            f"exporting checkpoint {str(step_dir)!r} with base model {str(base_model)!r} failed (exit "
            f"{done.returncode}): " + " | ".join(tail) + "; check that --base-model is the run's student model"
        )
    return target
