"""LoRA students: peft adapters on a frozen base, the base's identity, and the adapter-disabled reference.

Owns wrapping the loaded causal LM in peft's LoRA (`apply_lora`: base frozen,
adapters trainable; the trainer shards the result with FSDP2 as any student),
the identity of the base an adapter applies to (`protos.base_identity`, which
the trainer puts in checkpoints and policy announcements and the workers
compare with their own base), the adapter's state dict gathered from FSDP2
(`adapter_state_dict`, collective), writing a published adapter directory
(`write_adapter`), and `AdapterDisabledReference`: GRPO's KL reference as the
student itself with its adapter disabled, so no second copy of the weights.
Does not decide when to publish or checkpoint (the trainer does).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from protos.base_identity import base_identity
from student_trainer.batching import MicroBatch

if TYPE_CHECKING:
    from student_trainer.config import LoraConfig
    from student_trainer.model import StudentLoss

# What crosses to the workers with each adapter version: peft's two files, plus the base's identity.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_IDENTITY = "opd_base.json"


__all__ = ["base_identity"]  # re-exported: the trainer names it from here


def peft_config(config: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # pyright: ignore[reportArgumentType]  # annotated int; peft scales by any number
        lora_dropout=config.dropout,
        # peft's "all-linear": every nn.Linear of the decoder except the output layer (the lm-head)
        target_modules=list(config.target_modules) or "all-linear",
        task_type="CAUSAL_LM",
    )


def apply_lora(lm: nn.Module, config: LoraConfig) -> nn.Module:
    """`lm` wrapped in a peft LoRA model: base parameters frozen, adapter parameters trainable."""
    from peft import get_peft_model

    try:
        model = get_peft_model(lm, peft_config(config))
    except ValueError as exc:  # peft names the target modules it did not find
        raise ValueError(f"--lora-target-modules {list(config.target_modules)}: {exc}") from exc
    model.config.use_cache = False
    return model


def is_lora(lm: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(lm, PeftModel)


def adapter_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """The trainable (adapter) parameters, unsharded on CPU (collective: every rank gathers them in the same
    order), keyed as `root.lm.state_dict()` names them. Only these few are visited: torch's
    `get_model_state_dict` resolves the names of every parameter, the frozen base's included, which cost more
    than the gather itself on the demo's student. FSDP2's shards (`Shard(0)` on one mesh) are gathered in one
    collective (`_gather_flat`), none on a one-process mesh; any other layout one `full_tensor` each."""
    from torch.distributed.tensor import DTensor

    named = [(_state_dict_key(n), p) for n, p in root.named_parameters() if p.requires_grad]
    sharded = [p for _, p in named if isinstance(p, DTensor)]
    gathered: dict[int, Tensor] = {}
    if sharded and _flat_gatherable(sharded):
        gathered = {id(p): full for p, full in zip(sharded, _gather_flat(sharded), strict=True)}
    state = {}
    for key, param in named:
        if id(param) in gathered:
            full = gathered[id(param)]
        else:
            full = param.full_tensor() if isinstance(param, DTensor) else param
        state[key] = full.detach().to("cpu", copy=True)
    return state


def _flat_gatherable(params: list[Any]) -> bool:
    """Whether every DTensor is row-sharded (`Shard(0)`, FSDP2's default) on one 1-D mesh, in one dtype."""
    from torch.distributed.tensor import Shard

    mesh, dtype = params[0].device_mesh, params[0].dtype
    return mesh.ndim == 1 and all(
        p.device_mesh == mesh and p.dtype == dtype and tuple(p.placements) == (Shard(0),) and p.dim() >= 1
        for p in params
    )


def _gather_flat(params: list[Any]) -> list[Tensor]:
    """The full tensors of row-sharded DTensors, in one all-gather: each rank packs its shards, every shard
    padded to ceil(rows / world) rows (torch.chunk's split, which `Shard(0)` uses: rank k holds rows
    [k*c, min((k+1)*c, rows)), the last ranks possibly none), into one flat buffer; the gathered buffers are cut
    back into tensors. On a one-process mesh the local shard is the full tensor: no collective."""
    import torch.distributed as dist

    mesh = params[0].device_mesh
    world = mesh.size()
    if world == 1:
        return [p.to_local() for p in params]
    locals_ = [p.to_local() for p in params]
    chunk_rows = [-(-p.shape[0] // world) for p in params]
    sizes = [c * (p.numel() // p.shape[0] if p.shape[0] else 0) for c, p in zip(chunk_rows, params, strict=True)]
    packed = torch.zeros(sum(sizes), dtype=params[0].dtype, device=locals_[0].device)
    offset = 0
    for local, size in zip(locals_, sizes, strict=True):
        packed[offset : offset + local.numel()] = local.reshape(-1)
        offset += size
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=mesh.get_group())
    fulls, offset = [], 0
    for param, rows, size in zip(params, chunk_rows, sizes, strict=True):
        pieces = [part[offset : offset + size].view(rows, *param.shape[1:]) for part in parts]
        fulls.append(torch.cat(pieces)[: param.shape[0]])
        offset += size
    return fulls


def _state_dict_key(name: str) -> str:
    """A parameter's name as the state dict names it: the activation-checkpoint wrapper's segment dropped, and
    the trainer root's `lm.` prefix."""
    return name.replace("_checkpoint_wrapped_module.", "").removeprefix("lm.")


def write_adapter(lm: nn.Module, state: dict[str, Tensor], base_id: str, target: Path) -> None:
    """peft's adapter directory (adapter_model.safetensors + adapter_config.json, as `PeftModel.save_pretrained`
    writes them) and the base's identity at `target`, atomically (written aside, then renamed into place).
    Written directly: peft's `save_pretrained` also renders a model card from a template, which took longer
    than writing the weights."""
    from safetensors.torch import save_file

    adapter_name = str(getattr(lm, "active_adapter", "default"))
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    infix = f".{adapter_name}."
    tensors = {k.replace(infix, "."): v.contiguous() for k, v in state.items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    peft_lm: Any = lm  # a PeftModel: its peft_config maps adapter names to configs
    config = copy.deepcopy(peft_lm.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(tmp))
    (tmp / BASE_IDENTITY).write_text(json.dumps({"base_id": base_id}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def merged_model(model_dir: str, config: LoraConfig, state: dict[str, Tensor]) -> nn.Module:
    """A plain (unsharded, CPU) causal LM: the base in `model_dir` with the adapters of `state` (a LoRA student's
    full state dict, as `publish.full_state_dict` names it) merged into its weights (`opd export --merge`)."""
    from transformers import AutoModelForCausalLM

    from student_trainer.model import causal_lm

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=next(iter(state.values())).dtype)
    model = apply_lora(base, config)
    model.load_state_dict(state, strict=True)
    return causal_lm(model).merge_and_unload()


class AdapterDisabledReference:
    """GRPO's KL reference for a LoRA student: the student's own forward with its adapter disabled (the frozen
    base, which is the initial policy: LoRA's B starts at zero). Same interface as `ReferencePolicy`."""

    def __init__(self, root: StudentLoss) -> None:
        self.root = root

    @torch.no_grad()
    def __call__(self, batch: MicroBatch) -> Tensor:
        return self.root(batch, adapter_disabled_logprobs=True)

    def with_logprobs(self, batch: MicroBatch) -> MicroBatch:
        """The micro-batch with `inputs.reference_logprobs` filled in."""
        logprobs_N = self(batch)
        return dataclasses.replace(batch, inputs=dataclasses.replace(batch.inputs, reference_logprobs=logprobs_N))
