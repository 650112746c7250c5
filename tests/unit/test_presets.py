"""Every YAML preset in deploy/presets loads into its component's config (the presets are the only run presets)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from opd.config import read_yaml_preset, validate_config

pytestmark = pytest.mark.timeout(60)

PRESETS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "presets").glob("*.yaml"))

# preset file prefix -> (module, config class)
COMPONENTS = {
    "teacher": ("teacher_server.config", "TeacherConfig"),
    "rollout": ("rollout_workers.config", "RolloutConfig"),
    "train": ("student_trainer.config", "TrainerConfig"),
}


def test_there_are_presets():
    assert PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_loads_into_its_component_config(preset):
    prefix = preset.name.split("-")[0]
    assert prefix in COMPONENTS, f"{preset.name}: name presets <component>-<what>.yaml, component in {list(COMPONENTS)}"
    module, cls = COMPONENTS[prefix]
    config_cls = getattr(importlib.import_module(module), cls)
    validate_config(config_cls, read_yaml_preset(preset))
