"""Attention over packed micro-batches without a `[T, T]` mask, with PyTorch's own kernels.

Owns the attention function the student runs on a packed micro-batch (several
sequences in one row of T tokens, positions restarting at each): it is
registered with transformers' `AttentionInterface` under `ATTENTION_NAME` and
set on the student when it is loaded (`student_trainer.model`), so Qwen2,
Llama and the other transformers decoders call it from every layer. The
packing arrives as keyword arguments of the decoder's forward, which
transformers hands to the attention function (`packing_kwargs`). Methods:

- `sdpa`: per packed sequence, `scaled_dot_product_attention(is_causal=True)`
  on its own `[L, L]` block (flash or memory-efficient kernels on CUDA, the
  flash CPU kernel on CPU): memory linear in T, nothing crosses a sequence.
- `flex`: `flex_attention` with a document-causal `BlockMask`, compiled
  (CUDA only: PyTorch's flex_attention has no backward on CPU).
- `mask`: the reference, a dense `[T, T]` block-diagonal causal mask through
  SDPA (quadratic memory; `student_trainer.batching` builds it).

`auto` picks `sdpa` on every device. Without packing arguments (one sequence
per row, or the mask path) the function is transformers' own SDPA attention.
It does not pack sequences (`batching` does) or know about losses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_NAME = "opd_packed"
AttentionMethod = Literal["auto", "sdpa", "flex", "mask"]
PACKED_METHODS = ("sdpa", "flex")


def resolve_method(method: AttentionMethod, device: torch.device) -> str:
    """The method `auto` stands for on `device` (today `sdpa` everywhere), else `method`."""
    if method == "flex" and device.type != "cuda":
        raise ValueError(
            f"batch.attention=flex needs CUDA (PyTorch's flex_attention has no backward on {device.type}); "
            "use batch.attention=auto (per-sequence SDPA) or mask"
        )
    return "sdpa" if method == "auto" else method


def packing_kwargs(cu_tokens: Sequence[int], method: str, device: torch.device) -> dict:
    """Keyword arguments for the decoder's forward that make every layer attend per packed sequence.

    cu_tokens: cumulative sequence lengths of the packed row, (0, ..., T).
    """
    bounds = tuple(int(b) for b in cu_tokens)
    kwargs: dict = {"opd_seq_bounds": bounds, "opd_attention": method}
    if method == "flex":
        kwargs["opd_block_mask"] = document_block_mask(bounds, device)
    return kwargs


def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    bounds = kwargs.pop("opd_seq_bounds", None)
    method = kwargs.pop("opd_attention", None)
    block_mask = kwargs.pop("opd_block_mask", None)
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            "packed attention does not implement sliding-window layers; set batch.attention=mask for this model"
        )
    if query.shape[0] != 1 or bounds[-1] != query.shape[2]:
        raise ValueError(f"packed attention expects one row of {bounds[-1]} tokens, got query {tuple(query.shape)}")
    key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
    if method == "flex":
        out_1HTD = _flex(query, key, value, block_mask, scaling)
    else:
        out_1HTD = _per_sequence_sdpa(query, key, value, bounds, dropout, scaling)
    return out_1HTD.transpose(1, 2).contiguous(), None


def _repeat_kv(kv_1HTD: Tensor, num_heads: int) -> Tensor:
    """Grouped-query attention: each KV head serves num_heads / Hkv query heads (a view, then one copy)."""
    b, h_kv, t, d = kv_1HTD.shape
    if h_kv == num_heads:
        return kv_1HTD
    return kv_1HTD[:, :, None].expand(b, h_kv, num_heads // h_kv, t, d).reshape(b, num_heads, t, d)


def _per_sequence_sdpa(
    q: Tensor, k: Tensor, v: Tensor, bounds: tuple[int, ...], dropout: float, scaling: float | None
) -> Tensor:
    """Causal SDPA on each sequence's own block; [1, H, T, D]."""
    if len(bounds) == 2:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        parts.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, start:end],
                v[:, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
            )
        )
    return torch.cat(parts, dim=2)


def document_block_mask(bounds: tuple[int, ...], device: torch.device):
    """flex_attention BlockMask: token q attends to kv iff same sequence and kv <= q."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)], device=device)
    doc_T = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_T[q_idx] == doc_T[kv_idx]) & (q_idx >= kv_idx)

    t = bounds[-1]
    return create_block_mask(document_causal, None, None, t, t, device=device)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scaling: float | None) -> Tensor:
    return _flex_function(q.device.type)(q, k, v, block_mask=block_mask, scale=scaling)


@functools.cache
def _flex_function(device_type: str):
    """flex_attention compiled (its fused kernel; eager flex materialises the score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def register() -> str:
    """Register `packed_attention` with transformers (idempotent); returns its name for `attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    return ATTENTION_NAME
