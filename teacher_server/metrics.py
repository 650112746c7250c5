"""The teacher's Prometheus metrics (`opd_teacher_*`) on a per-server registry.

A plain holder: the scheduler and servicer fill it, the ops port exports it.
Each server instance owns its registry, so several servers in one process
(tests, benchmarks) never collide. Labels are low-cardinality: the client
name comes from the auth token map (or the `x-opd-client` header when auth is
off), the rpc from a fixed set, the code from grpc.StatusCode.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# fine below 25 ms: a light team's p50 beside a flood is read from these (opd bench tenants)
_LATENCY_BUCKETS_S = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opd_teacher_requests_total",
            "requests answered, by client, rpc and status code",
            ["client", "rpc", "code"],
            registry=r,
        )
        self.scored_tokens = Counter(
            "opd_teacher_scored_tokens_total", "positions scored, by client", ["client"], registry=r
        )
        self.generated_tokens = Counter(
            "opd_teacher_generated_tokens_total", "tokens sampled by Generate", ["client"], registry=r
        )
        self.internal_errors = Counter(
            "opd_teacher_internal_errors_total",
            "requests answered INTERNAL after an unexpected exception (logged with its traceback), by rpc",
            ["rpc"],
            registry=r,
        )
        self.request_latency = Histogram(
            "opd_teacher_request_latency_seconds",
            "request latency, by client and rpc",
            ["client", "rpc"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "opd_teacher_queue_wait_seconds",
            "time a request waited before its batch ran, by client",
            ["client"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_requests = Histogram(
            "opd_teacher_batch_size_requests", "requests per engine batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "opd_teacher_batch_size_tokens", "tokens per engine batch", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("opd_teacher_queue_depth_requests", "requests waiting for a batch", registry=r)
        self.inflight_batches = Gauge("opd_teacher_inflight_batches", "batches running in the engine", registry=r)
        self.engine_busy = Counter(
            "opd_teacher_engine_busy_seconds_total",
            "wall time batches spent in the engine (summed over concurrent batches)",
            registry=r,
        )
        self.express_requests = Counter(
            "opd_teacher_express_requests_total",
            "requests run in the express lane (their client within its share, nothing queued), by client",
            ["client"],
            registry=r,
        )
        self.bulk_yields = Counter(
            "opd_teacher_bulk_yields_total",
            "times a running bulk batch parked at a preemption point so that an express batch ran alone (hf)",
            registry=r,
        )
        self.bulk_yield_seconds = Counter(
            "opd_teacher_bulk_yield_seconds_total",
            "seconds bulk batches spent parked while express batches ran (hf; summed over bulk threads)",
            registry=r,
        )
        self.client_weight = Gauge(
            "opd_teacher_client_weight",
            "the client's fair-share weight as last read from the tokens file (set at its requests)",
            ["client"],
            registry=r,
        )
        self.engine_ready = Gauge("opd_teacher_engine_ready", "1 once the engine is loaded", registry=r)
