"""Chunked lm-head: logits, loss and gradients, `chunk_size` rows at a time.

Owns the memory bound of the losses. For each chunk of rows it runs the
lm-head (`hidden_CH @ weight_VH.T + bias_V`), hands the `[C, V]` logits to a
chunk function (which returns the chunk's loss sum and d loss / d logits) and,
when gradients are wanted, immediately folds d logits into d hidden and d
weight (and d bias), as Liger Kernel's fused linear losses do (Hsu et al.
2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"). Backward
then only scales the stored gradients by the incoming gradient. No `[N, V]`
tensor exists at any time: peak extra memory is O(chunk_size x V) plus the
weight gradient that any backward produces.

Softmax math runs in float32 (float64 stays float64); gradients accumulate in
the parameters' own dtype, as Liger does (bf16 weights: bf16 accumulation).
It knows nothing about divergences, teachers or weighting: the chunk function
(`student_trainer.loss.compute`) does. Backward may run once per forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# (logits_CV in compute dtype, row slice, need_grad) -> (loss sum [], d loss / d logits_CV or None)
ChunkFn = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None]]


def chunk_rows(vocab_size: int, chunk_size: int | None, budget_mib: float) -> int:
    """Rows per chunk: `chunk_size`, or as many as fit one fp32 [rows, V] tensor in `budget_mib`."""
    if chunk_size is not None:
        return chunk_size
    return max(1, int(budget_mib * 2**20 // (4 * vocab_size)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax math runs in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_slices(row_active_N: Tensor, rows_per_chunk: int) -> list[slice]:
    """Slices of `rows_per_chunk` rows, dropping chunks without an active row (one host sync)."""
    num_rows = row_active_N.shape[0]
    starts = range(0, num_rows, rows_per_chunk)
    if num_rows == 0:
        return []
    padded = torch.zeros(len(starts) * rows_per_chunk, dtype=torch.bool, device=row_active_N.device)
    padded[:num_rows] = row_active_N
    active = padded.view(len(starts), rows_per_chunk).any(dim=1).tolist()
    return [slice(s, min(s + rows_per_chunk, num_rows)) for s, keep in zip(starts, active, strict=True) if keep]


def run_chunks(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    chunk_fn: ChunkFn,
    chunks: list[slice],
    needs_grad: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss sum over `chunks` and the gradients flagged by `needs_grad` (hidden, weight, bias).

    Rows outside `chunks` get zero gradient. Gradients have the inputs' dtypes.
    """
    dtype = compute_dtype(hidden_NH.dtype)
    loss = torch.zeros((), dtype=dtype, device=hidden_NH.device)
    need_hidden, need_weight, need_bias = needs_grad
    grad_hidden_NH = _zeros_for(hidden_NH, need_hidden)
    grad_weight_VH = _zeros_for(weight_VH, need_weight)
    grad_bias_V = _zeros_for(bias_V, need_bias)
    for rows in chunks:
        hidden_CH = hidden_NH[rows]
        logits_CV = torch.nn.functional.linear(hidden_CH, weight_VH, bias_V).to(dtype)
        loss_chunk, dlogits_CV = chunk_fn(logits_CV, rows, any(needs_grad))
        loss += loss_chunk
        del logits_CV
        if dlogits_CV is None:
            continue
        dlogits_CV = dlogits_CV.to(weight_VH.dtype)
        if grad_hidden_NH is not None:
            torch.mm(dlogits_CV, weight_VH, out=grad_hidden_NH[rows])
        if grad_weight_VH is not None:
            grad_weight_VH.addmm_(dlogits_CV.T, hidden_CH.to(weight_VH.dtype))
        if grad_bias_V is not None:
            grad_bias_V += dlogits_CV.sum(0)
    return loss, grad_hidden_NH, grad_weight_VH, grad_bias_V


def _zeros_for(tensor: Tensor | None, wanted: bool) -> Tensor | None:
    if tensor is None or not wanted:
        return None
    return torch.zeros(tensor.shape, dtype=tensor.dtype, device=tensor.device)


# (hidden_NH, weight_VH, bias_V, needs_grad) -> (loss sum, grad hidden, grad weight, grad bias), as `run_chunks`
PassFn = Callable[[Tensor, Tensor, Tensor | None, tuple[bool, bool, bool]], tuple]


class FusedLinearChunkedLoss(torch.autograd.Function):
    """Scalar loss of a pass over the lm-head (`run_chunks`, or the tiled pass of `loss.tiled`); gradients
    computed in forward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, run: PassFn):  # type: ignore[override]
        loss, grad_hidden, grad_weight, grad_bias = run(hidden_NH, weight_VH, bias_V, tuple(ctx.needs_input_grad[:3]))
        # Plain attributes, not save_for_backward: backward hands these tensors
        # over and drops its reference, so autograd can take them without a copy.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("FusedLinearChunkedLoss supports one backward per forward")
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return scaled[0], scaled[1], scaled[2], None


def fused_linear_loss(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    chunk_fn: ChunkFn,
    chunks: list[slice],
) -> Tensor:
    """Differentiable scalar loss of `chunk_fn` over row chunks when autograd needs it; forward-only otherwise."""

    def run(hidden, weight, bias, needs_grad):
        return run_chunks(hidden, weight, bias, chunk_fn, chunks, needs_grad)

    return fused_pass_loss(hidden_NH, weight_VH, bias_V, run)


def fused_pass_loss(hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, run: PassFn) -> Tensor:
    """Differentiable scalar loss of the pass `run` when autograd needs it; a forward-only pass otherwise."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_NH, weight_VH, bias_V)
    )
    if wants_grad:
        return FusedLinearChunkedLoss.apply(hidden_NH, weight_VH, bias_V, run)
    with torch.no_grad():
        return run(hidden_NH, weight_VH, bias_V, (False, False, False))[0]
