"""The transformers generation backend: `generate` on one model, one request at a time.

The fallback when vLLM is not available (and the backend the CPU Ray tests
use). Behaviour log-probs are `log_softmax` of the processed scores
`generate` returns (after the temperature / top-k / top-p warpers), i.e. the
same quantity vLLM's `processed_logprobs` gives. A fresh GenerationConfig is
passed on every call so a model's shipped sampling defaults (top_k=50,
repetition penalties) never silently change the distribution. Requests and
reloads serialise on one lock; the work runs in a thread so the event loop
stays free for Redis. A LoRA student's adapter is merged into the weights
(`merged_adapter`), or with `engine.hf_lora: peft` served through peft's
wrapper (`peft_adapter`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rollout_workers.engine import BackendError, Generation, GenerationBackend, SampleParams

if TYPE_CHECKING:
    from rollout_workers.config import RolloutConfig
    from rollout_workers.merged_adapter import MergedAdapter
    from rollout_workers.peft_adapter import PeftAdapter

log = logging.getLogger(__name__)


def _device_and_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    import torch

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


class HFBackend(GenerationBackend):
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, max_model_len: int, policy_version: int = 0) -> None:
        self.model: Any = model  # a transformers causal LM (or, with hf_lora peft, its peft wrapper)
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.policy_version = policy_version
        self._lock = asyncio.Lock()
        self.hf_lora: Literal["merged", "peft"] = "merged"  # how a LoRA student's adapter is served
        self._adapter: MergedAdapter | PeftAdapter | None = None  # the serving adapter, once there is one

    @classmethod
    def from_config(cls, config: RolloutConfig) -> HFBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype = _device_and_dtype(config.engine.device, config.engine.dtype)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir())
        backend = cls(model, tokenizer, config.engine.max_model_len, config.policy_version)
        backend.base_dir, backend.hf_lora = config.model, config.engine.hf_lora
        return backend

    def _generation_config(self, params: SampleParams) -> Any:
        from transformers import GenerationConfig

        eos = list(params.stop_token_ids) or list(self.eos_token_ids)
        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            max_new_tokens=params.max_tokens,
            eos_token_id=eos or None,
            pad_token_id=self.tokenizer.pad_token_id or (eos or [0])[0],
            output_scores=True,
            return_dict_in_generate=True,
        )

    def _generate_sync(self, prompt_ids: list[int], params: SampleParams) -> tuple[list[int], list[float]]:
        import torch

        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        generator_state = torch.random.get_rng_state()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self._generation_config(params),
                )
        finally:
            if params.seed is not None:
                torch.random.set_rng_state(generator_state)
        new_ids = out.sequences[0, len(prompt_ids) :].tolist()
        logprobs = [
            float(torch.log_softmax(step[0].float(), dim=-1)[tok])
            for step, tok in zip(out.scores, new_ids, strict=True)
        ]
        return new_ids, logprobs

    async def generate(self, prompt_ids: list[int], params: SampleParams, request_id: str) -> Generation:
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise BackendError(
                f"request {request_id}: prompt ({len(prompt_ids)}) + max_tokens "
                f"({params.max_tokens}) exceeds max_model_len {self.max_model_len}"
            )
        async with self._lock:
            version = self.policy_version
            ids, logprobs = await asyncio.to_thread(self._generate_sync, list(prompt_ids), params)
        stop_ids = set(params.stop_token_ids) | set(self.eos_token_ids)
        finish = "stop" if ids and ids[-1] in stop_ids else "length"
        return Generation(ids, logprobs, finish, version)

    def _load_adapter_sync(self, adapter_dir: Path, version: int) -> None:
        """`hf_lora` merged (default): the adapter merged into the weights in place (`merged_adapter`), so
        generation runs at the base model's speed, for a copy of the target modules' base weights kept from the
        first adapter on and a merge of every target weight per version. peft: served through peft's wrapper
        (`peft_adapter`), a faster swap but slower generation."""
        from rollout_workers.merged_adapter import MergedAdapter
        from rollout_workers.peft_adapter import PeftAdapter

        if self._adapter is None:
            self._adapter = MergedAdapter(self.model) if self.hf_lora == "merged" else PeftAdapter(self.model)
        try:
            self._adapter.load(adapter_dir, version)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"adapter in {str(adapter_dir)!r} does not fit the model: {exc}") from exc
        self.model = self._adapter.model

    async def load_adapter(self, adapter_dir: Path, version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self._load_adapter_sync, adapter_dir, version)
            self.policy_version = version
        log.info("hf: serving LoRA adapter v%d from %s", version, adapter_dir)

    def _load_sync(self, weights_dir: Path) -> None:
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for file in sorted(weights_dir.glob("*.safetensors")):
            state.update(load_file(file))
        expected = set(self.model.state_dict())
        unexpected = sorted(state.keys() - expected)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = sorted(expected - state.keys() - tied)
        if unexpected or missing:  # checked before loading, so a bad checkpoint leaves the old weights intact
            raise BackendError(
                f"weights in {str(weights_dir)!r} do not fit the model: unexpected "
                f"{unexpected[:5]}, missing {missing[:5]}"
            )
        self.model.load_state_dict(state, strict=False)
        self._adapter = None  # new full weights are the base from now on

    async def load_policy(self, weights_dir: Path, version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self._load_sync, weights_dir)
            self.policy_version = version
        log.info("hf: loaded policy v%d from %s", version, weights_dir)
