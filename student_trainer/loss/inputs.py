"""The loss's inputs, by their former path: `TeacherTensors`, `LossInputs`, `LossStats` and `check_inputs` live in
`student_trainer.loss.compute` with the entry point they cross (`opd_apps`' benches import them from here)."""

from student_trainer.loss.compute import LossInputs, LossStats, TeacherTensors, check_inputs

__all__ = ["LossInputs", "LossStats", "TeacherTensors", "check_inputs"]
