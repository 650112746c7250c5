"""AdamW with linear warm-up then a constant or cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from student_trainer.config import OptimConfig


def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: OptimConfig, max_steps: int):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, max_steps))
    return optimizer, scheduler
