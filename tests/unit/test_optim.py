"""Learning-rate schedule: linear warm-up, then constant or cosine down to min_lr_ratio."""

from __future__ import annotations

import pytest

from student_trainer.config import OptimConfig
from student_trainer.optim import lr_factor

pytestmark = pytest.mark.timeout(30)


def test_warmup_then_constant():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_the_floor():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
