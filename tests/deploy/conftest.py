"""Fixtures shared by the deploy tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy import compose_project as cp


@pytest.fixture(scope="module")
def compose_secrets(tmp_path_factory) -> Path:
    """A directory where deploy/compose/make-secrets.sh (the documented command) wrote the secret files."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (make-secrets.sh draws the secrets with `openssl rand`)")
    directory = tmp_path_factory.mktemp("compose")
    script = directory / "make-secrets.sh"
    shutil.copy(cp.COMPOSE_DIR / "make-secrets.sh", script)
    subprocess.run(["sh", str(script)], check=True, capture_output=True, timeout=60)
    return directory
