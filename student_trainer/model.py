"""The student under FSDP2: process group, loading, sharding, and the forward that ends in the loss.

Owns: initialising torch.distributed (gloo on CPU, NCCL on GPU; a one-process
group when not launched by torchrun, so the same code runs everywhere),
loading the transformers causal LM, `fully_shard` per decoder layer and at
the root (bf16 mixed precision on GPU, optional activation checkpointing and
CPU offload), and `StudentLoss`, the root module whose forward runs the
decoder to final hidden states and hands them with the lm-head weight to the
chunked loss — inside the root's forward, so FSDP has the lm-head unsharded.
The student is loaded with the packed attention of `student_trainer.attention`:
a packed micro-batch attends per sequence (no `[T, T]` mask) unless it carries
the reference mask.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from opd.processes import free_port
from student_trainer import attention
from student_trainer.batching import MicroBatch
from student_trainer.loss.compute import LossStats, TeacherTensors, compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.planning import Denominators

if TYPE_CHECKING:  # the config module pulls in the trainer's runtime (Redis, HTTP); the model needs none of it
    from student_trainer.config import DistConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config: DistConfig) -> DistInfo:
    """Join the torchrun process group, or make a one-process group when run directly."""
    launched = "RANK" in os.environ  # by torchrun; else a one-process group of our own
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        tune_cpu_runtime()
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def tune_cpu_runtime() -> None:
    """Two process settings for training on CPU (idempotent; no-ops where unsupported).

    - Flush denormal floats to zero: far-off attention probabilities and tiny gradients are denormal, which x86
      CPUs compute ~20x slower (measured: 90 s vs 3.4 s for the backward of one 12k-token sequence). This sets
      the calling thread only; torch's worker threads keep their own flags.
    - A fixed glibc mmap threshold (1 MiB): by default glibc raises it to the size of each freed block (up to
      32 MiB), after which the chunked loss's blocks come from the heap and their fragments stay resident
      (measured: +180 MiB peak on the loss at N = 4096, V = 151,936). Fixed, every large tensor is mapped and
      returned to the system when freed.
    """
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc


_M_MMAP_THRESHOLD = -3  # glibc malloc.h


class Decoder(Protocol):
    """The decoder stack of a transformers causal LM: embeddings, `layers`, final norm."""

    layers: nn.ModuleList

    def __call__(
        self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool, **kwargs: Any
    ) -> Any: ...


class CausalLM(Protocol):
    """What the trainer calls on a transformers causal LM, or on peft's LoRA wrapper of one."""

    def get_decoder(self) -> Decoder: ...

    def get_output_embeddings(self) -> nn.Linear: ...

    def disable_adapter(self) -> AbstractContextManager[None]: ...  # peft's wrapper only

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None: ...

    def merge_and_unload(self) -> nn.Module: ...  # peft's wrapper only


def causal_lm(lm: nn.Module) -> CausalLM:
    """`lm` typed as the causal LM it is: `nn.Module.__getattr__` types every attribute it does not declare
    (the model's methods among them) as `Tensor | Module`, so only a cast can say what the module holds."""
    return cast(CausalLM, lm)


class StudentLoss(nn.Module):
    """Root module: decoder -> hidden rows -> chunked lm-head loss (no [tokens, vocab] logits).

    `attention`: how a packed micro-batch attends ('auto', 'sdpa', 'flex'; micro-batches carrying the
    reference `[T, T]` mask use it instead).
    """

    def __init__(
        self, lm: nn.Module, loss_config: LossConfig, attention_method: attention.AttentionMethod = "auto"
    ) -> None:
        super().__init__()
        self.lm = lm
        self.loss_config = loss_config
        self.attention_method: attention.AttentionMethod = attention_method

    def forward(
        self,
        batch: MicroBatch,
        teacher: TeacherTensors | None = None,
        step: int = 0,
        denominators: Denominators | None = None,
        *,
        adapter_disabled_logprobs: bool = False,
    ) -> tuple[torch.Tensor, LossStats] | torch.Tensor:
        """The loss and its statistics; with `adapter_disabled_logprobs` (a LoRA student, under no_grad) the
        base's log p(target) [N] instead (`student_trainer.lora.AdapterDisabledReference`: through the root's
        forward so FSDP unshards as usual)."""
        if adapter_disabled_logprobs:
            from student_trainer.reference import reference_logprobs

            with causal_lm(self.lm).disable_adapter():
                return reference_logprobs(self, batch)
        assert teacher is not None
        hidden_NH = self.hidden_rows(batch)
        head = causal_lm(self.lm).get_output_embeddings()
        return compute_distillation_loss(
            hidden_NH,
            head.weight,
            batch.inputs,
            teacher,
            self.loss_config,
            step,
            lm_head_bias_V=head.bias,
            denominators=denominators,
        )

    def hidden_rows(self, batch: MicroBatch) -> torch.Tensor:
        """Final hidden states [N, H] of the rows that predict response tokens."""
        kwargs: dict = {}
        if batch.attention_mask_11TT is not None:
            kwargs["attention_mask"] = batch.attention_mask_11TT
        elif len(batch.cu_tokens) > 2:  # several sequences: attend per sequence
            method = attention.resolve_method(self.attention_method, batch.input_ids_1T.device)
            kwargs.update(attention.packing_kwargs(batch.cu_tokens, method, batch.input_ids_1T.device))
        decoder = causal_lm(self.lm).get_decoder()
        hidden_1TH = decoder(
            input_ids=batch.input_ids_1T, position_ids=batch.position_ids_1T, use_cache=False, **kwargs
        ).last_hidden_state
        return hidden_1TH[0].index_select(0, batch.rows_N)


def load_student(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"student model {path!r} is not a Hugging Face model directory (no config.json); pass --model DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention.register())
    model.config.use_cache = False
    return model.to(device)  # pyright: ignore[reportArgumentType] - transformers' @wraps(Module.to) types self badly


RootT = TypeVar("RootT", bound=StudentLoss)


def shard_student(root: RootT, config: DistConfig, device: torch.device) -> RootT:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm-head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # An explicit mesh on the chosen device: FSDP's default mesh is CUDA whenever CUDA exists, which would
    # move a gloo/CPU run onto the GPU.
    kwargs: dict = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    root_kwargs = dict(kwargs)
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's inputs are the micro-batch and the teacher's log-probs: keep them in float32.
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    if config.cpu_offload:
        kwargs["offload_policy"] = root_kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = causal_lm(root.lm).get_decoder().layers
    for i, layer in enumerate(layers):
        if config.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            layer = checkpoint_wrapper(layer)
            layers[i] = layer
        fully_shard(layer, **kwargs)
    fully_shard(root, **root_kwargs)
    return root
