"""`opd demo --quick`: the same processes and Redis flows as the real demo, on tiny models, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from opd_apps.demo.supervisor import ChildFailed, Supervisor

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
    for section in (
        "## Goals",
        "## Held-out prompts: teacher, student before, student after (8 prompts, greedy)",
        "## Divergence on the eval-round prompts",
        "## Samples",
        "## Throughput",
    ):
        assert section in report, section
    assert "| before | 0 |" in report and "Divergence:" in report and "Task score:" in report
    assert "| training (ready -> trainer done" in report and "positions scored / s" in report
    # two prompts shown, each with greedy + two seeded samples per model
    for label in ("teacher", "student before", "student after"):
        for kind in ("greedy", "seed 0", "seed 1"):
            assert report.count(f"- {label}, {kind}: ") == 2, (label, kind)
    summary = json.loads((run_dir / "report.json").read_text())
    assert set(summary["models"]) == {"teacher", "student before", "student after"}
    for label, m in summary["models"].items():
        s = m["task_score"]
        assert s["items"] == 8 and 0 <= s["correct"] <= 8 and 0 <= s["low"] <= s["score"] <= s["high"] <= 1
        d = m["diversity"]
        assert 0 < d["distinct_answers"] <= 1 and 0 < d["distinct_1"] <= 1, (label, d)
        a = m["top1_agreement"]
        if label == "teacher":
            assert a is None
        else:
            assert a["positions"] > 0 and 0 <= a["low"] <= a["value"] <= a["high"] <= 1, (label, a)
    t = summary["timings_s"]
    assert t["startup_s"] > 0 and t["train_s"] > 0 and t["report_s"] > 0 and t["prepare_s"] >= 0
    budget = summary["goals"]["training_time"]
    assert budget["train_s"] == t["train_s"] and budget["met"] == (t["train_s"] <= budget["budget_s"] == 600)
    assert "- student: `" in report and "Training time:" in report and "at most while training" in report
    div = summary["goals"]["divergence"]
    assert div["before"] > 0 and div["after"] > 0 and div["met"] == (div["change"] <= -0.5)
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


def test_quick_demo_with_a_lora_student_publishes_adapters_and_reports_beside_a_baseline(tmp_path):
    """`opd demo --quick --lora`: the worker hot-loads adapters, the report evaluates the last one merged into the
    base and shows the student after training beside a full-weights run's (`--baseline-report`)."""
    baseline = tmp_path / "full-report.json"
    score = {"correct": 3, "items": 8, "score": 0.375, "low": 0.1, "high": 0.7}
    baseline.write_text(
        json.dumps(
            {
                "student": {"lora_rank": 0, "lr": 5e-3},
                "timings_s": {"train_s": 123.0},
                "goals": {"divergence": {"before": 2.0, "after": 1.0, "change": -0.5}},
                "models": {"student after": {"task_score": score, "top1_agreement": None}},
            }
        )
    )
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "opd", "demo", "--quick", "--lora", "--baseline-report", str(baseline)]
        + ["--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "step 3/3" in out.stdout
    last = sorted((run_dir / "weights").iterdir())[-1]
    assert last.name == "v00000003" and {p.name for p in last.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "opd_base.json",
    }
    assert "now sampling policy v3" in (run_dir / "logs" / "rollout.log").read_text()
    report = (run_dir / "report.md").read_text()
    assert "with LoRA adapters (rank 16, alpha 32" in report
    assert "## Student after training, beside the baseline run" in report
    assert (
        "| full weights (`" in report
        and "| 3/8 = 0.375 [0.100, 0.700] | n/a | 2.000 -> 1.000 (-50.0%) | 123 |" in report
    )
    summary = json.loads((run_dir / "report.json").read_text())
    assert summary["student"]["lora_rank"] == 16
    assert summary["models"]["student after"]["top1_agreement"]["positions"] > 0
