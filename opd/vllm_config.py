"""The vLLM engine knobs the teacher and the rollout workers share (`engine.vllm.*` in both configs).

Owns one name, range and description per knob, named as vLLM's
`AsyncEngineArgs` names them, so `engine_args()` passes them through as they
are; and the CPU build's KV-cache size, which vLLM reads from the environment
(config code owns `os.environ`). A component adds its own knobs by
subclassing (the rollout workers' `max_num_seqs`). Does not start an engine
and does not import vllm.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from opd.config import ConfigModel


class VllmConfig(ConfigModel):
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="vllm on GPU: share of GPU memory for weights + KV cache"
    )
    kv_cache_gib: int = Field(
        default=1, ge=1, description="vllm CPU build: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, when that is unset)"
    )
    enforce_eager: bool = Field(default=False, description="vllm: disable CUDA graphs / compilation")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs per engine (tensor parallel)")

    def engine_args(self) -> dict[str, Any]:
        """The knobs as `AsyncEngineArgs` keyword arguments (all but the CPU KV-cache size, an env variable)."""
        return self.model_dump(exclude={"kv_cache_gib"})

    def apply_cpu_env(self) -> None:
        """Set VLLM_CPU_KVCACHE_SPACE from `kv_cache_gib` unless it is set: vLLM's CPU build reads it at start."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
