"""The vLLM generation backend: one `AsyncLLM` engine, many requests in flight, live weight reload.

Behaviour log-probs come from the engine itself: `logprobs_mode=
"processed_logprobs"` makes the sampled token's log-prob (`logprobs=0`) the
one under the distribution after temperature / top-k / top-p. A reload pauses
the scheduler until in-flight requests finish (`mode="wait"`), reloads the
weights in every worker (`collective_rpc("reload_weights")`), resets the
prefix cache (its KV entries belong to the old weights) and resumes; new
requests wait for the reload, so each generation is tagged with the version
that produced it. A LoRA student's version is an adapter instead: served as a
new `LoRARequest` on the loaded base (no pause, no reload; the engine starts
with LoRA enabled when `engine.vllm.max_lora_rank` > 0). Not here: chat templates, tools, rewards, Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rollout_workers.engine import BackendError, Generation, GenerationBackend, SampleParams

if TYPE_CHECKING:
    from rollout_workers.config import RolloutConfig

log = logging.getLogger(__name__)


_Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _dtype(requested: _Dtype) -> _Dtype:
    import torch

    if requested != "auto":
        return requested
    return "auto" if torch.cuda.is_available() else "float32"


def _adapter_rank(adapter_dir: Path) -> int:
    try:
        return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{str(adapter_dir)!r} has no readable adapter_config.json with a rank r: {exc}") from exc


class VLLMBackend(GenerationBackend):
    name = "vllm"

    def __init__(self, engine: Any, tokenizer: Any, max_model_len: int, policy_version: int = 0) -> None:
        self.engine: Any = engine  # vllm's AsyncLLM (imported lazily); None once closed
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.policy_version = policy_version
        self._ready = asyncio.Event()  # cleared while weights are being swapped
        self._ready.set()
        self._reload_lock = asyncio.Lock()
        self.max_lora_rank = 0  # LoRA off; else the engine serves adapters up to this rank
        self._loras: list[Any] = []  # LoRARequests resident, oldest first; the last one serves new requests

    @classmethod
    def from_config(cls, config: RolloutConfig) -> VLLMBackend:
        """Start an AsyncLLM (about 15 s on CPU); call from the event loop that will use it."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        e = config.engine
        args = AsyncEngineArgs(
            model=config.model,
            tokenizer=config.tokenizer_dir(),
            dtype=_dtype(e.dtype),
            max_model_len=e.max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **e.vllm.engine_args(),
        )
        try:
            engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise BackendError(
                f"vLLM could not start on {config.model!r} ({type(exc).__name__}: {exc}); on CPU "
                f"check VLLM_CPU_KVCACHE_SPACE and --engine-max-model-len"
            ) from exc
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir())
        backend = cls(engine, tokenizer, e.max_model_len, config.policy_version)
        backend.base_dir, backend.max_lora_rank = config.model, e.vllm.max_lora_rank
        return backend

    def _sampling_params(self, params: SampleParams) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            max_tokens=params.max_tokens,
            seed=params.seed,
            logprobs=0,
            stop_token_ids=list(params.stop_token_ids) or None,
            detokenize=False,
        )

    async def generate(self, prompt_ids: list[int], params: SampleParams, request_id: str) -> Generation:
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise BackendError(
                f"request {request_id}: prompt ({len(prompt_ids)}) + max_tokens "
                f"({params.max_tokens}) exceeds max_model_len {self.max_model_len}"
            )
        await self._ready.wait()
        version = self.policy_version
        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)),
            self._sampling_params(params),
            f"{request_id}-{uuid.uuid4().hex[:8]}",
            lora_request=self._loras[-1] if self._loras else None,
        ):
            final = output
        if final is None or not final.outputs:
            raise BackendError(f"request {request_id}: the engine returned no output")
        completion = final.outputs[0]
        token_ids = [int(t) for t in completion.token_ids]
        logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs or [], token_ids, strict=True)]
        return Generation(token_ids, logprobs, completion.finish_reason or "length", version)

    async def load_policy(self, weights_dir: Path, version: int) -> None:
        async with self._reload_lock:
            self._ready.clear()
            try:
                await self.engine.pause_generation(mode="wait", clear_cache=True)
                try:
                    await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_dir)})
                    await self.engine.reset_prefix_cache()
                    self.policy_version = version
                finally:
                    await self.engine.resume_generation()
            except Exception as exc:
                raise BackendError(
                    f"vLLM weight reload from {str(weights_dir)!r} failed ({type(exc).__name__}: {exc})"
                ) from exc
            finally:
                self._ready.set()
        log.info("vllm: loaded policy v%d from %s", version, weights_dir)

    async def load_adapter(self, adapter_dir: Path, version: int) -> None:
        """A new `LoRARequest` for the adapter (the base stays loaded, no pause): requests that start afterwards
        use it; the adapter before the previous one is evicted (the previous one may still be finishing)."""
        from vllm.lora.request import LoRARequest

        rank = _adapter_rank(adapter_dir)
        if not self.max_lora_rank or rank > self.max_lora_rank:
            raise BackendError(
                f"adapter {str(adapter_dir)!r} has rank {rank}, but this vLLM engine serves LoRA up to rank "
                f"{self.max_lora_rank}: restart the worker with --engine-vllm-max-lora-rank >= {rank}"
            )
        request = LoRARequest(f"v{version}", version, str(adapter_dir))
        try:
            await self.engine.add_lora(request)
        except Exception as exc:
            raise BackendError(
                f"vLLM could not load adapter {str(adapter_dir)!r} ({type(exc).__name__}: {exc})"
            ) from exc
        self._loras.append(request)
        self.policy_version = version
        while len(self._loras) > 2:
            await self.engine.remove_lora(self._loras.pop(0).lora_int_id)
        log.info("vllm: serving LoRA adapter v%d from %s", version, adapter_dir)

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None  # let AsyncLLM.__del__ run now, not during interpreter teardown
