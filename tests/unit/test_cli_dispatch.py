"""Every `opd` command and benchmark names a module that exists and has `main`; `opd bench fuzz` without its
oracles (as from a wheel, which does not ship test code) says so instead of failing on an import."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from opd.cli import BENCHMARKS, COMMANDS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module", sorted({m for m, _ in COMMANDS.values()} | {m for m, _ in BENCHMARKS.values()}), ids=str
)
def test_each_dispatched_module_exists_and_defines_main(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is named by opd.cli but does not exist"
    tree = ast.parse(Path(spec.origin).read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{module} has no main()"


def test_bench_fuzz_without_the_oracles_names_the_missing_test_code() -> None:
    pytest.importorskip("hypothesis")
    pytest.importorskip("schemathesis")
    hide_tests = "import sys; sys.modules['tests'] = None; from opd.cli import main; sys.exit(main(['bench', 'fuzz']))"
    proc = subprocess.run(
        [sys.executable, "-c", hide_tests], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "tests/fuzz/oracles/" in proc.stdout and "source checkout" in proc.stdout, proc.stdout
