"""A LoRA adapter served merged into the hf backend's weights: W = W0 + scale * B @ A in every target module.

Owns reading a published peft adapter (`adapter_model.safetensors` + `adapter_config.json`), checking that it
fits the model, and writing the merged weights in place, so the worker generates at the base model's speed
(peft's unmerged wrapper adds two matmuls and Python dispatch to every projection). Each version is computed
from a kept copy of the base weights W0 of the modules it targets, never from the previous version's weights:
a new version replaces the previous delta (no accumulated rounding), and an adapter that stops targeting a
module gets W0 back. The cost is that copy: the target modules' base weights once more in memory (every linear
projection of the decoder: about 3/4 of a small model's parameters). Inference only: LoRA's dropout is off.
Does not watch for versions or serialise requests (`reload.py`, `engine_hf.HFBackend`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# peft's adapter file names a tensor `base_model.model.<module>.lora_A.weight` (or lora_B)
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# adapter_config.json settings a plain W0 + scale * B @ A merge does not implement
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication")


@dataclass(frozen=True)
class Adapter:
    """One adapter version: per target module (named as in the base model), its A (r x in) and B (out x r)."""

    scale: float
    factors: dict[str, tuple[Tensor, Tensor]]


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter in `adapter_dir`; ValueError for a config or tensors a merge cannot serve."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [key for key in _UNSUPPORTED if config.get(key)]
    if unsupported or config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ValueError(
            f"adapter settings the merged hf worker does not serve: {unsupported or ['bias']}; "
            "serve this adapter through peft's wrapper instead (--engine-hf-lora peft)"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A or B of a linear module")
        halves.setdefault(key[len(_PREFIX) : -len(suffix)], {})[_SUFFIXES[suffix]] = tensor
    lonely = sorted(name for name, half in halves.items() if len(half) != 2)
    if lonely:
        raise ValueError(f"adapter modules without both lora_A and lora_B: {lonely[:4]}")
    return Adapter(scale, {name: (half["A"], half["B"]) for name, half in halves.items()})


class MergedAdapter:
    """Serves one adapter at a time merged into `model`'s linear modules (in place)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base: dict[str, Tensor] = {}  # W0 of every module an adapter has targeted, copied on first use
        self.serving: Adapter | None = None

    def load(self, adapter_dir: Path, version: int = 0) -> None:
        """Merge the adapter in `adapter_dir` instead of the serving one. Everything is read and checked before
        the first weight changes, so a bad adapter leaves the previous one serving. (`version`: unused, as
        `PeftAdapter.load` takes it.)"""
        adapter = read_adapter(adapter_dir)
        modules = self._check(adapter)
        try:
            self._merge(adapter, modules)
        except Exception:  # not expected once checked (e.g. out of memory): put the previous version back whole
            self._restore_previous()
            raise
        self.serving = adapter

    def _check(self, adapter: Adapter) -> dict[str, nn.Linear]:
        """The target modules by name; ValueError naming what does not fit."""
        modules = dict(self.model.named_modules())
        tied = getattr(getattr(self.model, "config", None), "tie_word_embeddings", False)
        get_output = getattr(self.model, "get_output_embeddings", None)  # a transformers model's (the lm-head)
        output = get_output() if callable(get_output) else None
        found: dict[str, nn.Linear] = {}
        for name, (a_RI, b_OR) in adapter.factors.items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"adapter module {name!r} is not a linear module of this model")
            if tied and module is output:
                raise ValueError(f"adapter module {name!r} is the lm-head, tied to the input embeddings")
            out_features, in_features = module.weight.shape
            rank = a_RI.shape[0]
            if a_RI.shape != (rank, in_features) or b_OR.shape != (out_features, rank):
                raise ValueError(
                    f"adapter module {name!r}: A {tuple(a_RI.shape)} and B {tuple(b_OR.shape)} do not fit its "
                    f"weight {tuple(module.weight.shape)}"
                )
            found[name] = module
        return found

    @torch.no_grad()
    def _merge(self, adapter: Adapter, modules: dict[str, nn.Linear]) -> None:
        # one float32 buffer for every module's delta: no allocation per module (a fresh mapping, page faults
        # and all, wherever large blocks are mmapped, as in a process that also trains)
        largest = max((m.weight.numel() for m in modules.values()), default=0)
        device = next((m.weight.device for m in modules.values()), torch.device("cpu"))
        buffer = torch.empty(largest, dtype=torch.float32, device=device)
        for name, module in modules.items():
            w0 = self.base.get(name)
            if w0 is None:
                w0 = self.base[name] = module.weight.detach().clone()
            a_RI, b_OR = adapter.factors[name]
            weight = module.weight
            # float32 arithmetic whatever the serving dtype (bf16 on GPU): one rounding to it at the end
            a_RI, b_OR = a_RI.to(weight.device, torch.float32), b_OR.to(weight.device, torch.float32)
            # (scale * B) @ A, then one pass that reads W0 and writes W: the scale on the small factor, not on the
            # weight-sized delta (an add with alpha took 3x a plain add on this CPU)
            delta_OI = torch.mm(b_OR * adapter.scale, a_RI, out=buffer[: weight.numel()].view(weight.shape))
            if weight.dtype == torch.float32:
                torch.add(w0, delta_OI, out=weight)
            else:
                weight.copy_(w0.float() + delta_OI)
        self._unmerge(set(self.base) - set(modules))

    @torch.no_grad()
    def _unmerge(self, names: set[str]) -> None:
        """W0 back in the modules the serving adapter does not target."""
        all_modules = dict(self.model.named_modules())
        for name in names:
            module = all_modules[name]
            assert isinstance(module, nn.Linear)  # checked when its W0 was kept
            module.weight.copy_(self.base[name])

    def _restore_previous(self) -> None:
        if self.serving is None:
            self._unmerge(set(self.base))
        else:
            self._merge(self.serving, self._check(self.serving))
