"""The rollout workers' typed configuration (YAML preset < env `OPD_ROLLOUT__*` < CLI).

Owns every option of `opd rollout`: the student model and backend, sampling,
engine sizing, the Redis transport and queue limits, the prompt file format,
rewards, tools, weight reload, the fleet (local processes or Ray actors) and
the ops port. The vLLM knobs (`engine.vllm.*`) and the ops port are the
shared sub-configs of `opd/`; this module sets the workers' defaults and
renamed keys. Holds data only.
"""

from __future__ import annotations

import socket
from typing import Any, Literal

from pydantic import Field, model_validator

from opd.config import ConfigModel, Port
from opd.ops_app import OpsConfig
from opd.prompts import PromptSourceConfig
from opd.streams import RedisConfig
from opd.vllm_config import VllmConfig


class SamplingConfig(ConfigModel):
    temperature: float = Field(
        default=1.0, gt=0, le=10, description="sampling temperature (behaviour log-probs are taken after it)"
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(default=-1, ge=-1, description="top-k sampling (-1 = off)")
    max_tokens: int = Field(default=1024, ge=1, description="tokens generated per model turn")
    max_response_tokens: int = Field(
        default=4096, ge=1, description="response budget across all turns (generated + tool tokens)"
    )
    seed: int | None = Field(
        default=None,
        description="base seed; each sample gets a seed derived from it, the "
        "prompt id and the sample index (None = random)",
    )


class RolloutVllmConfig(VllmConfig):
    max_num_seqs: int = Field(default=64, ge=1, description="vllm: sequences batched at once")
    max_lora_rank: Literal[0, 1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=0,
        description="vllm: serve a LoRA student (a trainer run with --lora-rank): start the engine with LoRA "
        "enabled for adapters up to this rank (>= the run's rank; a larger adapter is refused); 0: full weights",
    )

    def engine_args(self) -> dict[str, Any]:
        """`VllmConfig`'s, plus LoRA (two adapters resident: the new version and the one still finishing)."""
        args = {k: v for k, v in super().engine_args().items() if k != "max_lora_rank"}
        if self.max_lora_rank:
            args.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=2, max_cpu_loras=2)
        return args


class RolloutEngineConfig(ConfigModel):
    renamed_keys = {
        name: f"vllm.{name}"
        for name in ("max_num_seqs", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size")
    }

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="compute dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    device: str = Field(default="auto", description="hf backend device: auto, cpu, cuda, cuda:N")
    max_model_len: int = Field(default=4096, ge=16, description="longest prompt + response in tokens")
    hf_lora: Literal["merged", "peft"] = Field(
        default="merged",
        description="hf backend, LoRA students: merged = each adapter merged into the weights (base generation "
        "speed; keeps a copy of the target modules' base weights and recomputes them per version); peft = "
        "served through peft's wrapper (a faster swap, slower generation)",
    )
    vllm: RolloutVllmConfig = Field(default_factory=RolloutVllmConfig)


class QueueConfig(ConfigModel):
    max_pending_rollouts: int = Field(
        default=4096, ge=1, description="stop producing while more rollouts than this are undelivered to the trainer"
    )
    max_pending_prompts: int = Field(
        default=1024,
        ge=1,
        description="the prompt feeder waits while more prompts than this are undelivered to the workers",
    )
    max_inflight_prompts: int = Field(default=8, ge=1, description="prompt groups one worker samples at once")
    heartbeat_ttl_s: float = Field(
        default=15.0,
        ge=0,
        description="each worker renews a heartbeat key with this TTL every third of it; the prompts of a "
        "worker whose heartbeat expired are taken over at once, however long a live worker takes (0 = off)",
    )
    claim_idle_s: float = Field(
        default=300.0,
        gt=0,
        description="fallback for workers without a heartbeat: a prompt pending this long is taken over",
    )
    max_deliveries: int = Field(default=3, ge=1, description="a prompt delivered more often than this is dead-lettered")
    block_ms: int = Field(default=1000, ge=1, description="how long one read waits for new prompts")


class ToolsConfig(ConfigModel):
    enabled: list[str] = Field(
        default_factory=list,
        description="tools the model may call: built-in "
        "`calculator` or `module:attribute` plug-ins; empty = single-turn",
    )
    max_turns: int = Field(default=4, ge=1, description="model turns per episode (tool answers in between)")
    max_tool_response_tokens: int = Field(default=256, ge=1, description="tokens of tool output appended per turn")
    timeout_s: float = Field(default=5.0, gt=0, description="time limit of one tool call")
    turn_prefix: str = Field(
        default="\n<|im_start|>user\n", description="text before the tool answers (ChatML / Qwen / Hermes format)"
    )
    turn_suffix: str = Field(
        default="<|im_end|>\n<|im_start|>assistant\n",
        description="text after the tool answers, opening the next model turn",
    )


class RewardConfig(ConfigModel):
    function: str | None = Field(
        default=None,
        description="reward: `math` (final/boxed answer, math-verify), `math_equiv` (the OPSD recipe's: "
        "last boxed answer, Hendrycks is_equiv normalisation), `exact` (exact match) or `module:function`; "
        "unset = no reward",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="time limit of one reward call (reward is null past it)")


class ReloadConfig(ConfigModel):
    poll_s: float = Field(
        default=5.0, gt=0, description="re-read the policy hash this often (pub/sub is the fast path)"
    )


class RolloutOpsConfig(OpsConfig):
    port: Port = Field(
        default=9102,
        description="ops HTTP port of worker 0 (/metrics /healthz /readyz); worker i uses "
        "port + i (0 = pick free ports)",
    )


class RolloutConfig(ConfigModel):
    model: str = Field(..., description="student model: a Hugging Face directory (config.json + safetensors)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory if not the model's")
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="generation engine (hf = transformers generate)")
    prompts: str | None = Field(
        default=None,
        description="JSONL/Parquet file fed to the {ns}:prompts stream before and "
        "while the workers run (unset: the trainer feeds prompts)",
    )
    feed_only: bool = Field(default=False, description="only feed --prompts to the stream, start no worker")
    exit_when_drained: bool = Field(
        default=False,
        description="exit once the prompt stream has nothing undelivered "
        "or pending (a standalone run over one prompt file)",
    )
    workers: int = Field(default=1, ge=1, description="worker processes on this machine")
    ray: str | None = Field(
        default=None,
        description="run the workers as Ray actors: `local` starts a local Ray, "
        "else a cluster address (auto, ray://HOST:PORT); `--ray` alone means local",
    )
    ray_num_cpus: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker actor")
    ray_num_gpus: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per worker actor")
    max_restarts: int = Field(default=3, ge=0, description="restarts of a crashed worker (process or Ray actor)")
    worker_index: int = Field(default=0, ge=0, description="this worker's index in its fleet (set by the fleet)")
    worker_id: str | None = Field(
        default=None,
        description="name prefix in Redis (default: the host name); worker i is "
        "`ID-i`, and a restarted worker resumes its own pending prompts first",
    )
    enable_thinking: bool | None = Field(
        default=None,
        description="chat template thinking switch (Qwen3-style templates); unset = the template's default",
    )
    policy_version: int = Field(
        default=0, ge=0, description="version of the weights in --model (announced newer versions are loaded live)"
    )
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM, time given to in-flight prompts")
    log_level: str = Field(default="INFO", description="logging level")
    redis: RedisConfig = Field(default_factory=RedisConfig)
    dataset: PromptSourceConfig = Field(default_factory=PromptSourceConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)
    ops: RolloutOpsConfig = Field(default_factory=RolloutOpsConfig)

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.redis.socket_timeout_s * 1000 <= self.queue.block_ms:
            raise ValueError("redis.socket_timeout_s must exceed queue.block_ms (a blocked read would time out)")
        if self.sampling.max_tokens > self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) exceeds engine.max_model_len "
                f"({self.engine.max_model_len}); lower --sampling-max-tokens"
            )
        if self.feed_only and not self.prompts:
            raise ValueError("--feed-only needs --prompts FILE")
        return self

    def consumer_name(self) -> str:
        return f"{self.worker_id or socket.gethostname()}-{self.worker_index}"

    def ops_port(self) -> int:
        return 0 if self.ops.port == 0 else self.ops.port + self.worker_index

    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model
