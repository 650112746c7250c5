"""The generation interface every rollout backend implements, and what crosses it.

A backend samples a continuation of a token-id prompt and returns the sampled
ids with their behaviour log-probs (log-prob of each sampled token under the
distribution actually sampled from: after temperature, top-k and top-p), and
swaps in new policy weights while live, tagging each generation with the
policy version whose weights produced it. It does not render chat templates,
run tools, score rewards or talk to Redis. Backends live in `engine_vllm.py`
(AsyncLLM, production) and `engine_hf.py` (transformers `generate`, fallback)
and are imported lazily, so this module imports neither torch nor vllm.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from opd.model_source import check_model_dir

if TYPE_CHECKING:
    from rollout_workers.config import RolloutConfig


class BackendError(RuntimeError):
    """The engine failed a request or a weight reload; the message says what to check."""


@dataclass(frozen=True)
class SampleParams:
    """How to sample one turn. `top_k=-1` and `top_p=1` are off; `seed=None` is random."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Generation:
    """One sampled turn: token ids [T] and their behaviour log-probs [T] (float)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS / stop token), "length", "abort"
    policy_version: int
    meta: dict[str, Any] = field(default_factory=dict)


class GenerationBackend(abc.ABC):
    """A loaded student model. Methods run on the worker's event loop."""

    name: str = "?"
    base_dir: str = ""  # the --model directory the engine was started from (the base of LoRA adapters)
    tokenizer: Any
    max_model_len: int
    policy_version: int = 0

    @abc.abstractmethod
    async def generate(self, prompt_ids: list[int], params: SampleParams, request_id: str) -> Generation:
        """Sample up to `params.max_tokens` tokens after `prompt_ids`."""

    @abc.abstractmethod
    async def load_policy(self, weights_dir: Path, version: int) -> None:
        """Replace the weights with those in `weights_dir`; generations that start afterwards carry `version`."""

    async def load_adapter(self, adapter_dir: Path, version: int) -> None:
        """Serve the LoRA adapter in `adapter_dir` (peft's files) on the base from now on, dropping the previous
        adapter; generations that start afterwards carry `version`. The base identity is checked by the caller."""
        raise BackendError(f"the {self.name} backend cannot serve LoRA adapters; run the student's full weights")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (int(eos),)


def sample_seed(base: int | None, prompt_id: str, index: int) -> int | None:
    """A per-sample seed derived from the base seed, the prompt and the sample index (None stays None)."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{prompt_id}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def resolve_weights_dir(uri: str) -> Path:
    """A policy URI (a directory path or `file://` URI on a shared filesystem) -> a directory of safetensors."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise BackendError(
            f"policy uri {uri!r}: only local or shared-filesystem directories (path or file://) "
            f"can be loaded; publish the weights to a path every worker can read"
        )
    path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    if not path.is_dir():
        raise BackendError(f"policy uri {uri!r}: {str(path)!r} is not a directory on this worker")
    if not any(path.glob("*.safetensors")):
        raise BackendError(f"policy uri {uri!r}: no *.safetensors files in {str(path)!r}")
    return path


async def create_backend(config: RolloutConfig) -> GenerationBackend:
    """Build the configured backend (loads weights; vLLM needs the running event loop it will serve on)."""
    check_model_dir(config.model)
    if config.backend == "hf":
        from rollout_workers.engine_hf import HFBackend

        return await asyncio.to_thread(HFBackend.from_config, config)
    config.engine.vllm.apply_cpu_env()
    from rollout_workers.engine_vllm import VLLMBackend

    return VLLMBackend.from_config(config)
