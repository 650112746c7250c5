"""A progress bar on stderr: tqdm when it is installed, else a plain one-line bar.

Owns nothing but drawing; `Progress(total, "sampling")` then `update(n)` and
`close()`. Disabled bars draw nothing, so callers need not branch.
"""

from __future__ import annotations

import sys
import time
from typing import Any

_MIN_REDRAW_S = 0.2


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self._bar: Any = None
        self._enabled = enabled
        self._last_draw = 0.0
        self._started = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._draw(force=True)
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled:
            self._draw()

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < _MIN_REDRAW_S and self.done < self.total:
            return
        self._last_draw = now
        share = self.done / self.total if self.total else 1.0
        filled = int(30 * share)
        sys.stderr.write(
            f"\r{self.desc}: [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {now - self._started:.0f}s"
        )
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
