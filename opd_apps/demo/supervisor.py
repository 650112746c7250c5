"""Running the pipeline's processes side by side: start, watch, stop them all.

Each child runs in its own process group with its output in a log file (the
trainer's progress lines are also echoed). When one child dies the others are
stopped (SIGTERM to the group, then SIGKILL after a grace period) and the
error names the child, its exit code and the end of its log; Ctrl-C stops
everything the same way, so no process is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opd.processes import stop_process


class ChildFailed(RuntimeError):
    """A supervised process exited while the others still needed it."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    echo: threading.Thread | None = field(default=None)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> Child:
        """Start `python -m opd ARGS...`; with `on_line`, stdout lines are passed to it (and logged)."""
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - owned by the child's lifetime
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd", *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE if on_line else log_file,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
        child = Child(name, proc, log_path)
        if on_line is not None:
            child.echo = threading.Thread(target=self._echo, args=(proc, log_file, on_line), daemon=True)
            child.echo.start()
        self.children.append(child)
        return child

    @staticmethod
    def _echo(proc: subprocess.Popen, log_file, on_line: Callable[[str], None]) -> None:
        assert proc.stdout is not None, "echoed children are started with stdout=PIPE"
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            on_line(line.rstrip("\n"))

    def check(self) -> None:
        """Raise ChildFailed if any child has exited with an error."""
        for child in self.children:
            code = child.proc.poll()
            if code not in (None, 0):
                raise ChildFailed(f"{child.name} exited with code {code}; the end of {child.log_path}:\n{child.tail()}")

    def stop_all(self, grace_s: float = 20.0) -> None:
        for child in reversed(self.children):
            stop_process(child.proc, grace_s, group=True)
