"""The public teacher client and the protos import without torch or vllm (students on any stack can use them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_client_and_protos_do_not_import_torch_or_vllm():
    code = (
        "import sys, teacher_server.client, protos.arrays, protos.tokenizer_fingerprint, opd.cli;"
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
