"""`TokenSums`: the one accumulator of per-token metrics, whose means weigh every token the same.

Per metric, a float64 sum and a token count. They add up over responses, micro-batches, eval rounds and
ranks (`merge`, or the raw `sums`/`counts` into an all-reduce), so a mean over many responses is the mean
over their tokens, never a mean of per-response means. Used by the trainer's step diagnostics and eval
rounds, `opd eval` and the demo's report. Computes no metric itself (`evaluation.divergence` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TokenSums:
    """Sums and token counts of per-token metrics; `means()` gives the token-weighted means."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, values_N: Any) -> float | None:
        """Add the per-token values [N] (numpy, a list, or a CPU tensor) of metric `name`; returns their own
        mean (None when N = 0)."""
        values = np.asarray(values_N, dtype=np.float64).reshape(-1)
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.size)
        return float(values.mean()) if values.size else None

    def add_all(self, per_token: Mapping[str, Any]) -> dict[str, float | None]:
        """`add` every metric of one response; returns that response's own means (None for an empty one)."""
        return {name: self.add(name, values) for name, values in per_token.items()}

    def merge(self, other: TokenSums) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def mean(self, name: str, empty: float | None = None) -> float | None:
        """The token mean of `name`; `empty` when no token of it was added."""
        n = self.counts.get(name, 0)
        return self.sums[name] / n if n else empty

    def means(self, empty: float | None = None) -> dict[str, float | None]:
        """Every metric's token mean; `empty` for a metric added with no tokens."""
        return {name: self.mean(name, empty) for name in self.counts}

    @property
    def tokens(self) -> int:
        """Tokens of the metric seen most often (every metric of a full reply counts the same tokens)."""
        return max(self.counts.values(), default=0)
