"""The reference policy of GRPO's KL penalty: a frozen copy of the initial student, held by the trainer.

Owns `ReferencePolicy`: the student model loaded a second time from
`model` (the run's initial weights, also on resume), never trained, sharded
like the student (FSDP2 per decoder layer and at the root, its own root
module so the lm-head is unsharded inside its forward), and
`target_logprobs(batch)`: log p_ref of each micro-batch's target tokens [N]
at `loss.student_temperature`, floored as the student's (`loss.logprob_floor`),
computed without gradient on the same packed micro-batch the student trains
on, with the lm-head applied in row chunks (no `[N, V]` logits). It is not in
the optimizer nor in checkpoints: it is the initial student by definition.

Costs one more copy of the weights (no gradients, no optimizer state) and one
forward pass per micro-batch. The KL formulas are in
`student_trainer.loss.divergences.kl_penalty`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import Tensor

from student_trainer import attention
from student_trainer.batching import MicroBatch
from student_trainer.loss import divergences as dv
from student_trainer.loss.config import LossConfig
from student_trainer.loss.fused_linear import chunk_rows, chunk_slices, compute_dtype, run_chunks
from student_trainer.model import StudentLoss, causal_lm


class Reference(Protocol):
    """What the step needs of a reference policy: `ReferencePolicy`, or a LoRA student's
    `student_trainer.lora.AdapterDisabledReference`."""

    def with_logprobs(self, batch: MicroBatch) -> MicroBatch: ...


class ReferencePolicy(StudentLoss):
    """Root module of the frozen reference: forward(batch) -> log p_ref(target) [N] (no gradient)."""

    def __init__(
        self, lm: torch.nn.Module, loss_config: LossConfig, attention_method: attention.AttentionMethod = "auto"
    ) -> None:
        super().__init__(lm, loss_config, attention_method)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, batch: MicroBatch) -> Tensor:  # type: ignore[override]
        return reference_logprobs(self, batch)

    def with_logprobs(self, batch: MicroBatch) -> MicroBatch:
        """The micro-batch (on its device) with `inputs.reference_logprobs` filled in."""
        logprobs_N = self(batch)
        return dataclasses.replace(batch, inputs=dataclasses.replace(batch.inputs, reference_logprobs=logprobs_N))


@torch.no_grad()
def reference_logprobs(root: StudentLoss, batch: MicroBatch) -> Tensor:
    """log p(target) [N] of `root`'s model on `batch` at `loss.student_temperature`, floored, lm-head in row
    chunks. Also the LoRA student's reference (`student_trainer.lora`, adapter disabled)."""
    hidden_NH = root.hidden_rows(batch)
    head = causal_lm(root.lm).get_output_embeddings()
    cfg = root.loss_config
    targets_N = batch.inputs.target_ids.long()
    out_N = torch.zeros(hidden_NH.shape[0], dtype=compute_dtype(hidden_NH.dtype), device=hidden_NH.device)

    def chunk(logits_CV: Tensor, rows: slice, need_grad: bool) -> tuple[Tensor, None]:
        student = dv.student_chunk(logits_CV, cfg.student_temperature, cfg.logprob_floor)
        out_N[rows] = student.logprobs_CV.gather(1, targets_N[rows][:, None]).squeeze(1)
        return logits_CV.new_zeros(()), None

    rows = chunk_rows(head.weight.shape[0], cfg.chunk_size, cfg.chunk_budget_mib)
    active_N = batch.inputs.loss_weights > 0
    run_chunks(hidden_NH, head.weight, head.bias, chunk, chunk_slices(active_N, rows))
    return out_N


def build_reference(config, info, dtype: torch.dtype = torch.float32) -> ReferencePolicy:
    """Load `config.model` once more as the frozen reference and shard it like the student (`config.dist`)."""
    from student_trainer.model import load_student, shard_student

    lm = load_student(config.model, info.device, dtype=dtype)
    reference = ReferencePolicy(lm, config.loss, config.batch.attention)
    return shard_student(reference, config.dist, info.device)
