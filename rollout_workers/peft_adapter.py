"""A LoRA adapter served unmerged through peft's wrapper by the hf backend (`engine.hf_lora: peft`).

Owns wrapping the base in a `PeftModel` on the first adapter (no copy of the base), copying each later adapter
of the same rank, alpha and target modules (every version of one run) into the serving adapter's tensors in
place, checked whole before the first copy so a bad file leaves the old adapter serving, and peft's
`load_adapter` (a new LoRA layer in every target module, made active, the old one deleted) for an adapter of
another shape. A version swap only copies the adapter's megabytes, but every projection then runs two more
matmuls and peft's Python dispatch per forward: slower generation than the merged default (`merged_adapter`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _adapter_parameters(model: Any, adapter_name: str) -> dict[str, Any]:
    """The adapter's tensors, keyed as peft's adapter file names them (the adapter name dropped)."""
    suffix = f".{adapter_name}."
    return {
        name.replace(suffix, "."): param
        for name, param in model.named_parameters()
        if suffix in name and ("lora_A" in name or "lora_B" in name)
    }


def _same_shape(active: Any, adapter_dir: Path) -> bool:
    """Whether the adapter in `adapter_dir` has the serving one's rank, scaling and target modules."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    return (
        config.get("r") == active.r
        and config.get("lora_alpha") == active.lora_alpha
        and bool(config.get("use_rslora")) == bool(active.use_rslora)
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and not active.rank_pattern
        and not active.alpha_pattern
        and sorted(targets if isinstance(targets, list) else [targets]) == sorted(active.target_modules)
    )


def _copy_adapter(params: dict[str, Any], adapter_dir: Path) -> None:
    """Copy the adapter file's tensors into `params` in place, after checking that names and shapes all match."""
    import torch
    from safetensors.torch import load_file

    state = load_file(adapter_dir / "adapter_model.safetensors")
    if state.keys() != params.keys():
        raise ValueError(f"adapter tensors differ: {sorted(state.keys() ^ params.keys())[:4]}")
    wrong = [k for k, v in state.items() if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"adapter tensors of another shape: {wrong[:4]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


class PeftAdapter:
    """Serves one adapter at a time through peft; `model` is the base until the first adapter, then its wrapper."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._name = ""  # the serving adapter's name in peft
        self._params: dict[str, Any] = {}  # its tensors, by adapter-file key

    def load(self, adapter_dir: Path, version: int) -> None:
        from peft import PeftModel

        name = f"v{version}"
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name).eval()
        elif _same_shape(self.model.peft_config[self._name], adapter_dir):
            _copy_adapter(self._params, adapter_dir)
            return
        else:
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(self._name)
            self.model.eval()
        self._name, self._params = name, _adapter_parameters(self.model, name)
