"""Config loading: YAML preset < environment < CLI, and errors that name the flag to change."""

from __future__ import annotations

import pytest

from opd.config import ConfigError, build_parser, load_config
from teacher_server.config import TeacherConfig

pytestmark = pytest.mark.timeout(30)


def _load(argv, environ=None):
    return load_config(
        TeacherConfig, argv, prog="t", description="d", env_prefix="OPD_TEACHER__", environ=environ or {}
    )


def test_cli_overrides_env_which_overrides_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: /m\nbackend: hf\ngrpc: {port: 1111}\nscheduler: {max_batch_tokens: 100}\n")
    env = {"OPD_TEACHER__GRPC__PORT": "2222", "OPD_TEACHER__SCHEDULER__MAX_BATCH_TOKENS": "200"}
    config = _load(["--config", str(preset), "--scheduler-max-batch-tokens", "300"], env)
    assert config.model == "/m" and config.backend == "hf"
    assert config.grpc.port == 2222  # env beats YAML
    assert config.scheduler.max_batch_tokens == 300  # CLI beats env
    assert config.ops.port == 9101 and config.grpc.host == "0.0.0.0"  # the documented defaults


def test_boolean_and_literal_flags():
    config = _load(["--model", "m", "--backend", "vllm", "--engine-allow-full-vocab"])
    assert config.engine.allow_full_vocab is True
    with pytest.raises(SystemExit):
        _load(["--model", "m", "--backend", "tensorrt"])


def test_invalid_value_names_the_flag_and_env_variable():
    with pytest.raises(ConfigError) as err:
        _load(["--model", "m", "--grpc-port", "70000"])
    assert "--grpc-port" in str(err.value) and "OPD_TEACHER__GRPC__PORT" in str(err.value)


def test_missing_required_field_is_reported():
    with pytest.raises(ConfigError, match="model"):
        _load([])


def test_unknown_yaml_key_is_an_error(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: m\ngrpc: {prot: 1}\n")
    with pytest.raises(ConfigError, match="grpc.prot"):
        _load(["--config", str(preset)])


def test_missing_or_malformed_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _load(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        _load(["--config", str(bad)])


def test_help_documents_every_field_with_default_and_env():
    text = build_parser(TeacherConfig, prog="opd teacher", description="d", env_prefix="OPD_TEACHER__").format_help()
    for flag in (
        "--model",
        "--backend",
        "--grpc-port",
        "--ops-port",
        "--engine-max-top-k",
        "--auth-tokens-file",
        "--scheduler-max-queued-requests",
        "--engine-allow-full-vocab",
    ):
        assert flag in text
    assert "OPD_TEACHER__GRPC__PORT" in text and "50051" in text
