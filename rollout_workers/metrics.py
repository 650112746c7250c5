"""The rollout workers' Prometheus metrics (`opd_rollout_*`) on a per-worker registry.

A plain holder filled by the worker, the episode results and the policy
watcher; the transport's own counters (`opd.streams.StreamStats`: dead
letters, retries, duplicates, reclaims, backpressure) are exported by
`opd.stream_metrics.StreamStatsCollector`, which reads them at scrape time,
so the transport stays free of Prometheus. Labels are low-cardinality
(split, outcome, tool name, stream).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from opd.stream_metrics import StreamStatsCollector
from opd.streams import StreamStats

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_REWARD_BUCKETS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class RolloutMetrics:
    def __init__(self, stats: StreamStats | None = None) -> None:
        self.registry = CollectorRegistry()
        self.stats = stats if stats is not None else StreamStats()
        r = self.registry
        self.rollouts = Counter("opd_rollout_rollouts_total", "rollouts pushed, by split", ["split"], registry=r)
        self.generated_tokens = Counter("opd_rollout_generated_tokens_total", "tokens sampled by the model", registry=r)
        self.tool_tokens = Counter(
            "opd_rollout_tool_tokens_total", "tool-answer tokens spliced into responses", registry=r
        )
        self.prompts = Counter(
            "opd_rollout_prompts_total",
            "prompt groups finished, by outcome (done, failed, dead)",
            ["outcome"],
            registry=r,
        )
        self.generation_latency = Histogram(
            "opd_rollout_generation_latency_seconds",
            "time to sample one whole prompt group",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.response_tokens = Histogram(
            "opd_rollout_response_length_tokens", "response length in tokens", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.reward = Histogram("opd_rollout_reward", "reward of each rollout", buckets=_REWARD_BUCKETS, registry=r)
        self.reward_failures = Counter(
            "opd_rollout_reward_failures_total", "reward calls that failed or timed out", registry=r
        )
        self.tool_calls = Counter(
            "opd_rollout_tool_calls_total", "tool calls, by tool and outcome", ["tool", "outcome"], registry=r
        )
        self.queue_depth = Gauge(
            "opd_rollout_queue_depth_records", "records undelivered, by stream", ["stream"], registry=r
        )
        self.inflight_prompts = Gauge("opd_rollout_inflight_prompts", "prompt groups being sampled", registry=r)
        self.weight_reloads = Counter(
            "opd_rollout_weight_reloads_total", "weight reloads, by outcome", ["outcome"], registry=r
        )
        self.weight_reload_latency = Histogram(
            "opd_rollout_weight_reload_seconds", "time to swap weights", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.policy_version = Gauge("opd_rollout_policy_version", "policy version being sampled", registry=r)
        self.engine_ready = Gauge("opd_rollout_engine_ready", "1 once the engine is loaded", registry=r)
        r.register(StreamStatsCollector(self.stats, "rollout"))
