"""Optional experiment logging of the per-step statistics: TensorBoard and Weights & Biases.

Prometheus (`/metrics`) and `/status` are always on; these are for people who
follow runs in TensorBoard or W&B. Each backend is imported only when its
option is set, and a missing package is a clear error at start-up, not a
crash mid-run. Rank 0 logs; other ranks get a logger that does nothing. The
run's config goes to W&B redacted (`opd.redaction`): no token, no password.
"""

from __future__ import annotations

import math
from typing import Any

from opd.redaction import redacted_dump
from student_trainer.config import LoggingConfig, TrainerConfig


class StepLogger:
    def __init__(self, config: LoggingConfig, run_config: TrainerConfig, is_main: bool) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        if not is_main:
            return
        if config.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError(
                    "logging.tensorboard_dir is set but the `tensorboard` package is missing: "
                    "pip install tensorboard (or unset --logging-tensorboard-dir)"
                ) from exc
            self._tb = SummaryWriter(log_dir=config.tensorboard_dir)
        if config.wandb_project:
            try:
                import wandb  # pyright: ignore[reportMissingImports]  # optional, not in opd's dependencies
            except ImportError as exc:
                raise ValueError(
                    "logging.wandb_project is set but the `wandb` package is missing: "
                    "pip install wandb (or unset --logging-wandb-project)"
                ) from exc
            self._wandb = wandb.init(
                project=config.wandb_project,
                name=config.wandb_run_name,
                mode=config.wandb_mode,
                config=redacted_dump(run_config),  # the run's config, without the teacher token or Redis password
            )

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        finite = {
            f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
