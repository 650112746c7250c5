"""The sub-configs the components share (ops port, vLLM knobs) and renamed keys as deprecated aliases."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest

from opd.config import (
    ConfigError,
    DeprecatedConfigKey,
    build_parser,
    flag_name,
    iter_renamed_leaves,
    load_config,
    read_yaml_preset,
    validate_config,
)
from opd.ops_app import OpsConfig
from opd.vllm_config import VllmConfig
from rollout_workers.config import RolloutConfig
from student_trainer.config import TrainerConfig
from teacher_server.config import TeacherConfig

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "teacher": (TeacherConfig, "OPD_TEACHER__"),
    "rollout": (RolloutConfig, "OPD_ROLLOUT__"),
    "train": (TrainerConfig, "OPD_TRAIN__"),
}
PRESETS = sorted(
    [*(REPO / "deploy" / "presets").glob("*.yaml"), *(REPO / "deploy" / "k8s/base/presets").glob("*.yaml")]
)


def _load(cls, argv, environ=None, prefix="OPD_ROLLOUT__"):
    return load_config(
        cls, ["--model", "m", *argv], prog="t", description="d", env_prefix=prefix, environ=environ or {}
    )


# ------------------------------------------------------------------------------------------- ops port


@pytest.mark.parametrize(("name", "port"), [("teacher", 9101), ("rollout", 9102), ("train", 9103)])
def test_each_component_sets_its_own_ops_port_on_the_shared_ops_config(name, port):
    cls, prefix = CONFIGS[name]
    config = _load(cls, [], prefix=prefix)
    assert isinstance(config.ops, OpsConfig) and config.ops.port == port and config.ops.host == "0.0.0.0"
    # A preset that sets only the host keeps the component's port (not the shared class's).
    assert validate_config(cls, {"model": "m", "ops": {"host": "127.0.0.1"}}).ops.port == port
    assert _load(cls, ["--ops-port", "0", "--ops-host", "::1"], prefix=prefix).ops.port == 0
    with pytest.raises(ConfigError, match="--ops-port"):
        _load(cls, ["--ops-port", "65536"], prefix=prefix)


# ------------------------------------------------------------------------------------------- vLLM knobs


@pytest.mark.parametrize("cls", [TeacherConfig, RolloutConfig])
def test_teacher_and_rollout_name_the_vllm_knobs_alike(cls):
    knobs = cls(model="m").engine.vllm
    assert isinstance(knobs, VllmConfig)
    assert set(VllmConfig.model_fields) <= set(type(knobs).model_fields)
    text = build_parser(cls, prog="t", description="d", env_prefix="OPD_X__").format_help()
    for name in VllmConfig.model_fields:
        assert flag_name(("engine", "vllm", name)) in text


def test_engine_args_are_the_knobs_minus_the_cpu_kv_cache():
    config = RolloutConfig(model="m", engine={"vllm": {"max_num_seqs": 8, "tensor_parallel_size": 2}})
    assert config.engine.vllm.engine_args() == {
        "gpu_memory_utilization": 0.85,
        "enforce_eager": False,
        "tensor_parallel_size": 2,
        "max_num_seqs": 8,
    }
    assert "max_num_seqs" not in TeacherConfig(model="m").engine.vllm.engine_args()  # the teacher keeps vLLM's


def test_apply_cpu_env_sets_the_kv_cache_size_only_when_unset(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    VllmConfig(kv_cache_gib=3).apply_cpu_env()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    VllmConfig(kv_cache_gib=5).apply_cpu_env()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_knobs_are_named_as_vllm_engine_args_names_them():
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    names = {f.name for f in dataclasses.fields(arg_utils.AsyncEngineArgs)}
    for cls in (TeacherConfig, RolloutConfig):
        assert set(cls(model="m").engine.vllm.engine_args()) <= names


# ------------------------------------------------------------------------------------------- renamed keys

# (config, old YAML path, new YAML path, value, old flag, old env)
RENAMED = [
    (
        TeacherConfig,
        "OPD_TEACHER__",
        ("engine", "tensor_parallel_size"),
        ("engine", "vllm", "tensor_parallel_size"),
        2,
        ["--engine-tensor-parallel-size", "2"],
        "OPD_TEACHER__ENGINE__TENSOR_PARALLEL_SIZE",
    ),
    (
        TeacherConfig,
        "OPD_TEACHER__",
        ("engine", "vllm_kv_cache_gib"),
        ("engine", "vllm", "kv_cache_gib"),
        4,
        None,
        "OPD_TEACHER__ENGINE__VLLM_KV_CACHE_GIB",
    ),
    (
        RolloutConfig,
        "OPD_ROLLOUT__",
        ("engine", "gpu_memory_utilization"),
        ("engine", "vllm", "gpu_memory_utilization"),
        0.5,
        ["--engine-gpu-memory-utilization", "0.5"],
        "OPD_ROLLOUT__ENGINE__GPU_MEMORY_UTILIZATION",
    ),
    (
        RolloutConfig,
        "OPD_ROLLOUT__",
        ("engine", "enforce_eager"),
        ("engine", "vllm", "enforce_eager"),
        True,
        ["--engine-enforce-eager"],
        "OPD_ROLLOUT__ENGINE__ENFORCE_EAGER",
    ),
    (
        RolloutConfig,
        "OPD_ROLLOUT__",
        ("engine", "max_num_seqs"),
        ("engine", "vllm", "max_num_seqs"),
        7,
        ["--engine-max-num-seqs", "7"],
        "OPD_ROLLOUT__ENGINE__MAX_NUM_SEQS",
    ),
]
IDS = [".".join(r[2]) + f"-{r[0].__name__}" for r in RENAMED]


def _get(config, path):
    for key in path:
        config = getattr(config, key)
    return config


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


@pytest.mark.parametrize(("cls", "prefix", "old", "new", "value", "flag", "env"), RENAMED, ids=IDS)
def test_a_renamed_key_still_works_from_yaml_env_and_flags_with_a_warning(
    tmp_path, cls, prefix, old, new, value, flag, env
):
    assert _get(cls(model="m"), new) != value  # else the test could not tell
    preset = tmp_path / "p.yaml"
    preset.write_text(f"model: m\n{old[0]}:\n  {old[1]}: {str(value).lower()}\n")
    with pytest.warns(DeprecatedConfigKey, match=rf"{'.'.join(old)}.*deprecated.*{'.'.join(new)}"):
        assert _get(_load(cls, ["--config", str(preset)], prefix=prefix), new) == value
    with pytest.warns(DeprecatedConfigKey, match=rf"{env}.*deprecated.*{prefix}{'__'.join(new).upper()}"):
        assert _get(_load(cls, [], {env: str(value).lower()}, prefix), new) == value
    if flag is not None:
        with pytest.warns(DeprecatedConfigKey, match=rf"{flag[0]}.*deprecated.*{flag_name(new)}"):
            assert _get(_load(cls, flag, prefix=prefix), new) == value
    with pytest.warns(DeprecatedConfigKey):  # a config built in code
        assert _get(cls.model_validate({"model": "m", **_nest(old, value)}), new) == value


def test_a_renamed_flag_that_kept_its_spelling_does_not_warn():
    # engine.vllm_enforce_eager -> engine.vllm.enforce_eager: the flag is --engine-vllm-enforce-eager both times.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecatedConfigKey)
        config = _load(TeacherConfig, ["--engine-vllm-enforce-eager"], prefix="OPD_TEACHER__")
    assert config.engine.vllm.enforce_eager is True


def test_precedence_follows_the_source_not_the_spelling(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: m\nengine:\n  vllm:\n    max_num_seqs: 3\n")
    with pytest.warns(DeprecatedConfigKey):
        config = _load(RolloutConfig, ["--config", str(preset)], {"OPD_ROLLOUT__ENGINE__MAX_NUM_SEQS": "4"})
    assert config.engine.vllm.max_num_seqs == 4  # old env name beats the new YAML key
    with pytest.warns(DeprecatedConfigKey):
        config = _load(RolloutConfig, ["--engine-vllm-max-num-seqs", "5"], {"OPD_ROLLOUT__ENGINE__MAX_NUM_SEQS": "4"})
    assert config.engine.vllm.max_num_seqs == 5  # new flag beats the old env name


def test_old_and_new_name_in_one_source_is_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"--engine-max-num-seqs.*--engine-vllm-max-num-seqs.*keep only"):
        _load(RolloutConfig, ["--engine-max-num-seqs", "2", "--engine-vllm-max-num-seqs", "3"])
    preset = tmp_path / "p.yaml"
    preset.write_text("model: m\nengine:\n  kv_cache_gib: 2\n  vllm: {kv_cache_gib: 3}\n")
    with pytest.raises(ConfigError, match=r"engine.kv_cache_gib.*engine.vllm.kv_cache_gib"):
        _load(RolloutConfig, ["--config", str(preset)])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_renamed_key_points_at_a_field_and_its_old_flag_parses(name):
    cls, prefix = CONFIGS[name]
    parser = build_parser(cls, prog="t", description="d", env_prefix=prefix)
    for old, new, field in iter_renamed_leaves(cls):
        assert field is _field(cls, new)
        action = next(a for a in parser._actions if flag_name(old) in a.option_strings)
        assert action.dest in ("__".join(old), "__".join(new))


def _field(cls, path):
    for key in path[:-1]:
        cls = cls.model_fields[key].annotation
    return cls.model_fields[path[-1]]


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(REPO)) for p in PRESETS])
def test_shipped_presets_use_no_deprecated_key(preset):
    cls, _ = CONFIGS[preset.name.split("-")[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecatedConfigKey)
        validate_config(cls, read_yaml_preset(preset))
