"""Prometheus export of the Redis transport's counters, for every component that uses the streams.

Owns `StreamStatsCollector`, which reads an `opd.streams.StreamStats` at
scrape time and exposes it as `opd_<component>_*_total` counters (dead
letters, retries, duplicates, reclaims, backpressure wait), so the transport
itself stays free of Prometheus. The rollout workers and the trainer each
register one on their own registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from opd.streams import StreamStats

# (name after the component prefix, help, StreamStats field); counters gain `_total` when exposed
_COUNTERS = (
    (
        "dead_lettered_records",
        "stream entries moved to {ns}:dead (undecodable or delivered too often)",
        "dead_lettered",
    ),
    ("redis_retries", "Redis operations retried after a connection loss", "retries"),
    ("duplicate_records", "stream entries skipped (and acked) as already used", "duplicates_skipped"),
    ("reclaimed_records", "stream entries taken over from a consumer silent past the claim idle time", "reclaimed"),
    ("backpressure_wait_seconds", "time producers waited for consumers to catch up", "backpressure_wait_s"),
)


class StreamStatsCollector(Collector):
    """Exports a StreamStats as `opd_<component>_<counter>_total` (component: `rollout`, `trainer`)."""

    def __init__(self, stats: StreamStats, component: str) -> None:
        self.stats, self.prefix = stats, f"opd_{component}_"

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc, attr in _COUNTERS:
            yield CounterMetricFamily(self.prefix + name, doc, value=getattr(self.stats, attr))
