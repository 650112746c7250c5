"""Every `opd bench ...` command at its `--quick` size, through the `opd` CLI: it runs to the end and prints
its table with a row per setting and the ratio against the baseline measured in the same run.

The numbers themselves are not asserted (timings belong in BENCHMARKS.md, not in tests); what is checked is
the shape of the output and that each measured quantity and ratio is a positive finite number. The losses
benchmark's memory cap is also checked: an allocation past it is reported as `out of memory`, not a crash.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str, cache_dir: Path | None = None, timeout_s: float = 280) -> str:
    env = dict(os.environ)
    if cache_dir is not None:
        env["OPD_CACHE_DIR"] = str(cache_dir)  # the tiny models are built here, not in the user's cache
    proc = subprocess.run(
        [sys.executable, "-m", "opd", "bench", name, "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def positive(text: str) -> float:
    value = float(text.replace(",", "").rstrip("x%"))
    assert math.isfinite(value) and value > 0, text
    return value


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("opd-cache")


@pytest.mark.timeout(120)
def test_queue_prints_opd_and_raw_rates_and_their_ratio_per_size_and_phase(redis_url):
    out = run_bench("queue", "--redis-url", redis_url, timeout_s=100)
    rows = [line.strip("|").split("|") for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    cells = {(int(r[0]), r[2].strip()): [c.strip() for c in r] for r in rows}
    assert set(cells) == {(256, "produce"), (256, "consume"), (1024, "produce"), (1024, "consume")}, out
    for row in cells.values():
        opd_rate, raw_rate, ratio = positive(row[3]), positive(row[5]), positive(row[7])
        # opd / raw of the unrounded rates, printed to 2 decimals; the rates are printed to a whole record/s.
        assert ratio == pytest.approx(opd_rate / raw_rate, abs=0.005 + 0.5 * (1 + ratio) / raw_rate), row


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_losses_prints_a_row_per_method_and_a_ratio_line_per_size():
    out = run_bench("losses", "--losses", "rkl", "--v", "4096", "8192", "--methods", "seed", "fused")
    rows = [line for line in out.splitlines() if line.startswith("| rkl | 256 |")]
    assert len(rows) == 4 and sum("(b) seed chunks" in r for r in rows) == 2, out
    ratios = [line for line in out.splitlines() if line.startswith("ratio rkl N=256")]
    assert [re.search(r"V=(\d+)", line).group(1) for line in ratios] == ["4096", "8192"], out
    for line in ratios:
        less, time_ratio, cpu_ratio = re.search(r"= ([\d.]+)x less; .* = ([\d.]+)x; .* = ([\d.]+)x$", line).groups()
        assert all(positive(v) for v in (less, time_ratio, cpu_ratio)), line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_losses_reports_a_configuration_past_its_memory_cap_as_out_of_memory():
    out = run_bench("losses", "--losses", "rkl", "--v", "8192", "--methods", "full", "--memory-cap-gib", "0.001")
    rows = [line for line in out.splitlines() if "(a) full logits" in line]
    assert len(rows) == 1 and "out of memory" in rows[0], out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_teacher_prints_service_vs_in_process_and_wire_bytes_vs_json(bench_cache):
    out = run_bench("teacher", cache_dir=bench_cache, timeout_s=400)
    assert "backend hf" in out and "vocab 384" in out, out
    speed = {
        m.group(1): (positive(m.group(2)), positive(m.group(3)))
        for m in re.finditer(r"^(in-process backend|gRPC service, \d client\(s\))\s+(\d+)\s+([\d.]+)x$", out, re.M)
    }
    assert set(speed) == {"in-process backend", "gRPC service, 1 client(s)", "gRPC service, 2 client(s)"}, out
    base = speed["in-process backend"][0]
    assert speed["in-process backend"][1] == 1.0
    for tok_s, ratio in speed.values():  # ratio to 2 decimals, rates to a whole position/s
        assert ratio == pytest.approx(tok_s / base, abs=0.005 + 0.5 * (1 + ratio) / base), out
    cell = r"\s+([\d.]+) \([\d.]+\)"  # request + reply bytes per token (reply alone)
    lines = re.finditer(rf"^\s+(\d+){cell}{cell}{cell}\s+([\d.]+)x$", out, re.M)
    wire = {int(m.group(1)): m.groups()[1:] for m in lines}
    assert set(wire) == {0, 20, 64}, out
    for k, cells in wire.items():
        f32, bf16, json_bytes, ratio = map(positive, cells)
        assert bf16 < f32 < json_bytes, (k, out)  # bfloat16 halves the log-probs; JSON spells every entry out
        # ratio to 1 decimal; the byte counts per token to 1 decimal (error <= 0.05 each)
        expected = json_bytes / bf16
        assert ratio == pytest.approx(expected, abs=0.05 + expected * (0.05 / bf16 + 0.05 / json_bytes)), (k, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_prints_the_teacher_wait_share_per_prefetch_depth(bench_cache):
    out = run_bench("trainer", cache_dir=bench_cache)
    rows = {
        int(m.group(1)): (float(m.group(2)), positive(m.group(3)), positive(m.group(4)))
        for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)%\s+(\d+)\s+([\d.]+)x$", out, re.M)
    }
    assert set(rows) == {0, 1}, out
    assert rows[0][2] == 1.0, out
    for share, tok_s, ratio in rows.values():  # share to 0.1 %, rates to a whole token/s, ratio to 2 decimals
        assert 0.0 <= share <= 100.0
        assert ratio == pytest.approx(tok_s / rows[0][1], abs=0.005 + 0.5 * (1 + ratio) / rows[0][1]), out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trainer_micro_batch_mode_prints_mask_and_packed_rows_and_skips_the_mask_past_its_cap():
    # the mask path's [T, T] tensors (5 T^2 bytes): 1.3 MB at T = 512 (under a 2.1 MB cap), 5.2 MB at T = 1024
    out = run_bench("trainer", "--micro-batch-tokens", "512,1024", "--mask-cap-gib", "0.002", timeout_s=380)
    rows = {
        (int(m.group(1)), m.group(2)): [c.strip() for c in m.group(3).split("|")]
        for m in re.finditer(r"^\| (\d+) \| (mask|sdpa) \| (.*) \|$", out, re.M)
    }
    assert set(rows) == {(512, "mask"), (512, "sdpa"), (1024, "mask"), (1024, "sdpa")}, out
    assert rows[(1024, "mask")][0].startswith("skipped: its [T, T] mask tensors need"), out
    for cells in (rows[(512, "mask")], rows[(512, "sdpa")], rows[(1024, "sdpa")]):
        assert all(positive(v) for v in cells[:3]), out  # peak MiB, step s, tokens/s
    less, ratio = rows[(512, "sdpa")][3:5]  # against the mask path measured in the same run
    assert positive(less.removesuffix(" less")) and positive(ratio), out
