"""The student under FSDP2: process group, loading, sharding, and the forward that ends in the loss.

Owns: initialising torch.distributed (gloo on CPU, NCCL on GPU; a one-process
group when not launched by torchrun, so the same code runs everywhere),
loading the transformers causal LM, `fully_shard` per decoder layer and at
the root (bf16 mixed precision on GPU, optional activation checkpointing and
CPU offload), and `StudentLoss`, the root module whose forward runs the
decoder to final hidden states and hands them with the lm-head weight to the
chunked loss — inside the root's forward, so FSDP has the lm-head unsharded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from opd.processes import free_port
from student_trainer.batching import MicroBatch
from student_trainer.config import DistConfig
from student_trainer.loss.compute import compute_distillation_loss
from student_trainer.loss.config import LossConfig
from student_trainer.loss.inputs import LossStats, TeacherScores

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
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


class StudentLoss(nn.Module):
    """Root module: decoder -> hidden rows -> chunked lm-head loss (no [tokens, vocab] logits)."""

    def __init__(self, lm: nn.Module, loss_config: LossConfig) -> None:
        super().__init__()
        self.lm = lm
        self.loss_config = loss_config

    def forward(self, batch: MicroBatch, teacher: TeacherScores, step: int) -> tuple[torch.Tensor, LossStats]:
        decoder = self.lm.get_decoder()
        hidden_1TH = decoder(
            input_ids=batch.input_ids_1T,
            position_ids=batch.position_ids_1T,
            attention_mask=batch.attention_mask_11TT,
            use_cache=False,
        ).last_hidden_state
        hidden_NH = hidden_1TH[0].index_select(0, batch.rows_N)
        head = self.lm.get_output_embeddings()
        return compute_distillation_loss(
            hidden_NH, head.weight, batch.inputs, teacher, self.loss_config, step, lm_head_bias_V=head.bias
        )


def load_student(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"student model {path!r} is not a Hugging Face model directory (no config.json); pass --model DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model.to(device)


def shard_student(root: StudentLoss, config: DistConfig, device: torch.device) -> StudentLoss:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm-head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # An explicit mesh on the chosen device: FSDP's default mesh is CUDA whenever CUDA exists, which would
    # move a gloo/CPU run onto the GPU.
    kwargs: dict = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = root.lm.get_decoder().layers
    for i, layer in enumerate(layers):
        if config.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            layer = checkpoint_wrapper(layer)
            layers[i] = layer
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return root
