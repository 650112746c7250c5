"""`opd demo --quick`: the same processes and Redis flows as the real demo, on tiny models, end to end."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from opd_apps.supervisor import ChildFailed, Supervisor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_quick_demo_runs_every_component_and_writes_the_report(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "opd", "demo", "--quick", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "live page: http://127.0.0.1:" in out.stdout
    assert "step 3/3" in out.stdout
    report = (run_dir / "report.md").read_text()
    assert "| before | 0 |" in report and "Divergence change" in report
    assert report.count("- student after: ") == 3 and "positions scored / s" in report
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"teacher.log", "rollout.log", "trainer.log"}
    assert sorted(p.name for p in (run_dir / "weights").iterdir())[-1] == "v00000003"
    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert not leftovers  # every child process was stopped


def test_supervisor_reports_a_dead_child_and_stops_the_others(tmp_path, tiny_model_dir):
    sup = Supervisor(tmp_path / "logs")
    alive = sup.start(
        "teacher", ["teacher", "--model", str(tiny_model_dir), "--backend", "hf", "--grpc-port", "0", "--ops-port", "0"]
    )
    sup.start("broken", ["teacher", "--model", "/does/not/exist"])
    deadline = time.monotonic() + 60
    with pytest.raises(ChildFailed) as err:
        while time.monotonic() < deadline:
            sup.check()
            time.sleep(0.2)
    assert "broken exited with code 2" in str(err.value) and "does not exist" in str(err.value)
    sup.stop_all(grace_s=10)
    assert alive.proc.poll() is not None
