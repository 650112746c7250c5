"""TensorBoard logging of the trainer's per-step statistics (the events file holds what was logged)."""

from __future__ import annotations

import pytest

from student_trainer.config import LoggingConfig, TrainerConfig
from student_trainer.metrics import StepLogger

pytestmark = pytest.mark.timeout(60)


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = StepLogger(LoggingConfig(tensorboard_dir=str(tmp_path)), TrainerConfig(model="m"), is_main=True)
    logger.log(1, {"loss": 2.5, "mean_divergence": 1.5, "skipped": float("nan")})
    logger.log(2, {"loss": 2.0, "mean_divergence": 1.0})
    logger.log(2, {"divergence": 0.7}, prefix="eval")
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.value for e in events.Scalars("eval/divergence")] == [pytest.approx(0.7)]
    assert "train/skipped" not in events.Tags()["scalars"]  # NaN is not logged


def test_other_ranks_and_unset_options_log_nothing(tmp_path):
    StepLogger(LoggingConfig(tensorboard_dir=str(tmp_path)), TrainerConfig(model="m"), is_main=False).log(1, {"x": 1})
    StepLogger(LoggingConfig(), TrainerConfig(model="m"), is_main=True).log(1, {"x": 1})
    assert not any(tmp_path.iterdir())
