"""Checkpoints with torch.distributed.checkpoint: sharded model and optimizer, plus the trainer's own state.

A checkpoint is the directory `step-XXXXXXXX` under `checkpoint.dir`; it is
written as `.step-XXXXXXXX.tmp` and renamed only after every rank's shards and
rank 0's `trainer_state.pt` (step, scheduler, RNG, the prompt feeder's
position and ledger, the samples used) are on disk, so the rename is the commit. Rollouts are acknowledged on
Redis only after it: delivery is at-least-once, and a rollout redelivered after
a crash is skipped when the checkpoint lists its (prompt id, sample index) as used.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(directory: str) -> Path | None:
    root = Path(directory)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []
    return steps[-1] if steps else None


def _model_and_optim(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's trainable parameters (all of them, or a LoRA student's adapters: its base is `--model`'s) and
    the optimizer's state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(root, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def check_student_kind(path: Path, trainer_state: dict[str, Any], base_id: str) -> None:
    """Refuse a checkpoint of another kind of student (full weights vs LoRA) or a LoRA one of another base."""
    saved = trainer_state.get("base_id", "")
    if bool(saved) != bool(base_id):
        was, now = ("LoRA", "full-weight") if saved else ("full-weight", "LoRA")
        raise ValueError(
            f"checkpoint {str(path)!r} is of a {was} student but this run trains a {now} student: resume with "
            f"the run's own --lora-rank ({'> 0' if saved else '0'}), or use a new --checkpoint-dir"
        )
    if saved != base_id:
        raise ValueError(
            f"checkpoint {str(path)!r} holds LoRA adapters for base {saved}, but --model is {base_id}: resume "
            f"with the run's own --model, or use a new --checkpoint-dir"
        )


def save_checkpoint(
    directory: str,
    step: int,
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    barrier: Callable[[str], None] | None = None,
) -> Path:
    """Collective. Returns the committed directory. `barrier(what)` waits for every rank (default:
    `dist.barrier`; the trainer passes one that logs while it waits)."""
    barrier = barrier or _dist_barrier
    final = Path(directory) / f"step-{step:08d}"
    tmp = Path(directory) / f".step-{step:08d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"rank 0 to create {tmp}")
    dcp_save(_model_and_optim(root, optimizer), checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the commit
        for old in sorted(p for p in Path(directory).iterdir() if _STEP_DIR.match(p.name))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint committed: %s", final)
    barrier(f"rank 0 to commit {final}")
    return final


def _dist_barrier(what: str) -> None:
    dist.barrier()


def load_checkpoint(path: Path, root: nn.Module, optimizer: torch.optim.Optimizer, base_id: str = "") -> dict[str, Any]:
    """Collective. Loads model and optimizer in place; returns the trainer state (RNG already restored).
    `base_id`: the run's LoRA base identity ("" for a full-weight student); a checkpoint of the other kind, or of
    another base, is refused before anything is loaded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    check_student_kind(path, trainer_state, base_id)
    state = _model_and_optim(root, optimizer)
    dcp_load(state, checkpoint_id=str(path))
    # A LoRA student's checkpoint lacks its frozen base (that is `--model`): load the adapters, the rest stays.
    frozen = any(not p.requires_grad for p in root.parameters())
    options = StateDictOptions(ignore_frozen_params=True, strict=not frozen)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    set_rng_state(trainer_state["rng"])
    log.info("resumed from %s (step %d)", path, trainer_state["step"])
    return trainer_state
