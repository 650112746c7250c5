"""Model-directory resolution shared by every component (`opd/model_source.py`): what is accepted, and errors
that name the path and the fix. The embedded model's conversion itself runs in the demo, not here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opd.config import ConfigError
from opd.model_source import EMBEDDED, check_model_dir, resolve_model_dir

pytestmark = pytest.mark.timeout(60)


def test_a_directory_with_config_json_is_returned_as_a_path(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert check_model_dir(str(tmp_path)) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_a_missing_path_is_refused_naming_it(tmp_path: Path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist") as err:
        check_model_dir(missing)
    assert missing in str(err.value) and EMBEDDED not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist") as err:
        resolve_model_dir(missing)
    assert "`embedded`" in str(err.value)  # only where `embedded` is accepted is it suggested


@pytest.mark.parametrize("make", ["dir", "file"])
def test_a_path_without_config_json_is_refused(tmp_path: Path, make: str):
    path = tmp_path / "weights"
    path.mkdir() if make == "dir" else path.write_bytes(b"\0")
    for check in (check_model_dir, resolve_model_dir):
        with pytest.raises(ConfigError, match="has no config.json"):
            check(str(path))


def test_the_rollout_engine_checks_the_model_directory_before_loading(tmp_path: Path):
    import asyncio

    from rollout_workers.config import RolloutConfig
    from rollout_workers.engine import create_backend

    config = RolloutConfig(model=str(tmp_path), backend="hf")
    with pytest.raises(ConfigError, match="has no config.json"):
        asyncio.run(create_backend(config))


def test_resolving_a_directory_imports_neither_torch_nor_transformers(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    code = (
        f"import sys; from opd.model_source import resolve_model_dir; resolve_model_dir({str(tmp_path)!r});"
        "bad = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
