"""Prometheus export of retry counts (`opd.retry.RetryStats`), for the components whose clients retry.

Owns `RetryStatsCollector`, which reads a RetryStats at scrape time and
exposes one counter with the labels `address` and `reason` (the failed
call's status code or exception type), so the retry loops stay free of
Prometheus. Addresses are the few configured targets, not per-request values.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from opd.retry import RetryStats


class RetryStatsCollector(Collector):
    """Exports `stats` as the counter `{name}_total{address, reason}` (`name` without `_total`)."""

    def __init__(self, stats: RetryStats, name: str, documentation: str) -> None:
        self.stats, self.name, self.documentation = stats, name, documentation

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["address", "reason"])
        for (address, reason), count in sorted(self.stats.counts.items()):
            family.add_metric([address, reason], count)
        yield family
