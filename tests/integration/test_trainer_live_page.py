"""The trainer's live page draws the curves from /status: loaded in headless Chromium, its charts show points."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from opd.loop_thread import LoopThread
from opd.ops_app import OpsServer
from student_trainer.metrics import TrainerMetrics, TrainerStatus
from student_trainer.runtime import trainer_ops_app

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def trainer_ops():
    status = TrainerStatus(step=5, max_steps=10, policy_version=5, tokens_per_s=123.0)
    status.history = [
        {"step": i, "loss": 2.0 / i, "mean_divergence": 3.0 / i, "tokens_per_s": 100.0 + i} for i in range(1, 6)
    ]
    status.evals = [{"step": 0, "divergence": 3.1}, {"step": 5, "divergence": 1.9}]
    io = LoopThread()
    server = OpsServer(trainer_ops_app(status.snapshot, TrainerMetrics().registry, lambda: True), "127.0.0.1", 0)
    port = io.call(server.start())
    yield f"http://127.0.0.1:{port}"
    io.call(server.stop())
    io.stop()


def test_status_and_page_are_served(trainer_ops):
    assert httpx.get(f"{trainer_ops}/status").json()["history"][0]["step"] == 1
    page = httpx.get(f"{trainer_ops}/")
    assert page.status_code == 200 and "/static/chart.js" in page.text and "cdn" not in page.text.lower()
    assert "function draw" in httpx.get(f"{trainer_ops}/static/chart.js").text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs Debian's chromium)")
def test_chart_shows_the_data_points_in_headless_chromium(trainer_ops, tmp_path):
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"{trainer_ops}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = out.stdout
    assert "chart-divergence" in dom, out.stderr[-2000:]
    counts = dict(re.findall(r'id="chart-(\w+)"[^>]*data-points="(\d+)"', dom))
    assert counts == {"divergence": "5", "eval": "2", "loss": "5", "tokens": "5"}, counts
    assert dom.count('class="point"') == 17
    assert "step 5/10" in dom
