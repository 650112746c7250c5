"""Evaluation statistics that need no model: pass@k, Wilson and bootstrap intervals, diversity.

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. (2021, "Evaluating
  Large Language Models Trained on Code", eq. 1), 1 - C(n-c, k) / C(n, k), in
  its product form so that no binomial coefficient is ever formed;
  `mean_pass_at_k` averages it over prompts.
- `wilson_interval(successes, trials)`: the Wilson score interval of a
  proportion (Wilson 1927), 95 % by default, from scipy
  (`scipy.stats.binomtest(...).proportion_ci(method="wilson")`).
- `bootstrap_ratio_interval(pairs)`: the percentile bootstrap over items of
  sum(a) / sum(b), e.g. agreeing positions over positions per prompt, from
  scipy (`scipy.stats.bootstrap`, paired, fixed seed).
- `distinct_n` and `diversity`: distinct-n (Li et al. 2016: unique n-grams /
  all n-grams) and the share of distinct final answers.

No torch and no I/O; scipy is imported by the two intervals only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    Equals 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i); exact in float for any n (each factor
    lies in [0, 1), so the product cannot overflow).
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and n >= 1 (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (got k={k}, n={n}); draw at least k samples per prompt")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class PassAtK:
    """pass@k averaged over the prompts that have at least k scored samples."""

    k: int
    value: float | None  # None when no prompt has k scored samples
    prompts: int  # prompts averaged over


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> PassAtK:
    """Mean pass@k over prompts given as (n scored samples, c correct); prompts with n < k are left out."""
    values = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return PassAtK(k, sum(values) / len(values) if values else None, len(values))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (lower, upper) of a proportion: successes out of independent trials, at the
    two-sided confidence level of the normal quantile `z` (1.96: 95 %)."""
    from scipy.stats import binomtest, norm

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(
            f"a Wilson interval needs 0 <= successes <= trials and trials >= 1 (got {successes} of {trials})"
        )
    ci = binomtest(successes, trials).proportion_ci(confidence_level=float(2 * norm.cdf(z) - 1), method="wilson")
    # At p = 0 (or 1) the bound is exactly 0 (or 1); clamp the float rounding.
    low = 0.0 if successes == 0 else max(0.0, float(ci.low))
    return low, 1.0 if successes == trials else min(1.0, float(ci.high))


def bootstrap_ratio_interval(
    pairs: Sequence[tuple[float, float]], level: float = 0.95, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(a) / sum(b) over items; `pairs` holds one (a, b) per item, b >= 0.

    Items are resampled whole (the positions of one answer are not independent, so an interval over
    positions would be too narrow); items with b = 0 carry nothing and are left out. (NaN, NaN) when no item
    has b > 0; the ratio itself, twice, for one item.
    """
    import numpy as np
    from scipy.stats import bootstrap

    kept = np.asarray([(a, b) for a, b in pairs if b], dtype=np.float64).reshape(-1, 2)
    if len(kept) == 0:
        return math.nan, math.nan
    if len(kept) == 1:
        ratio = float(kept[0, 0] / kept[0, 1])
        return ratio, ratio

    def ratio_of_sums(a, b, axis=-1):
        return np.sum(a, axis=axis) / np.sum(b, axis=axis)

    result = bootstrap(
        (kept[:, 0], kept[:, 1]),
        ratio_of_sums,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def distinct_n(sequences: Iterable[Sequence[Hashable]], n: int) -> float | None:
    """Unique n-grams / all n-grams over `sequences` (n-grams never cross two sequences); None if there are none."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1 (got {n})")
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


@dataclass(frozen=True)
class Diversity:
    distinct_answers_share: float | None  # distinct final answers / responses that have one (None: none has one)
    answers: int  # responses with a final answer
    distinct_1: float | None  # unique words / words
    distinct_2: float | None  # unique word pairs / word pairs


def diversity(texts: Sequence[str], answers: Sequence[str | None] | None = None) -> Diversity:
    """Diversity of a set of responses (e.g. one per prompt, across prompts).

    `answers` are the responses' final answers (already normalised; None = no answer found), one per text;
    distinct-1/2 count whitespace-separated words.
    """
    if answers is not None and len(answers) != len(texts):
        raise ValueError(f"diversity: {len(answers)} answers for {len(texts)} texts; give one answer (or None) each")
    given = [a for a in (answers or []) if a is not None]
    words = [text.split() for text in texts]
    return Diversity(
        distinct_answers_share=len(set(given)) / len(given) if given else None,
        answers=len(given),
        distinct_1=distinct_n(words, 1),
        distinct_2=distinct_n(words, 2),
    )
