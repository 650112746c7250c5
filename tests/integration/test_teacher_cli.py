"""`opd teacher` as a user runs it: documented options, clear errors for bad input, drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from opd.processes import free_port
from teacher_server.client import TeacherClientSync

pytestmark = pytest.mark.timeout(180)


def _opd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_every_option():
    out = _opd("teacher", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--backend", "--grpc-port", "--ops-port", "--engine-max-top-k", "--auth-tokens-file"):
        assert flag in out.stdout


def test_top_level_help_lists_commands_and_benchmarks():
    assert "teacher" in _opd("--help").stdout
    assert "losses" in _opd("bench", "--help").stdout


@pytest.mark.parametrize("model,message", [("/does/not/exist", "does not exist"), ("/tmp", "has no config.json")])
def test_bad_model_path_is_a_clear_error(model, message):
    out = _opd("teacher", "--model", model, "--backend", "hf", "--grpc-port", "0", "--ops-port", "0")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bad_option_value_is_a_clear_error():
    out = _opd("teacher", "--model", "x", "--grpc-port", "-5")
    assert out.returncode == 2 and "--grpc-port" in out.stderr


@pytest.mark.slow
def test_serves_then_drains_on_sigterm(tiny_model_dir):
    port, ops = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opd",
            "teacher",
            "--model",
            str(tiny_model_dir),
            "--backend",
            "hf",
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(port),
            "--ops-host",
            "127.0.0.1",
            "--ops-port",
            str(ops),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPD_TEACHER__GRPC__DRAIN_GRACE_S": "5"},
    )
    try:
        with TeacherClientSync(f"127.0.0.1:{port}", timeout_s=90) as client:
            assert client.score([1, 2, 3, 4], 1, top_k=2).token_logprobs.shape == (3,)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "draining" in err and "teacher stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
