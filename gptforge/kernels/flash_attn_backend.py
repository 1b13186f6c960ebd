"""The ``flash_attn`` backend: Dao-AILab's FlashAttention 2 package, where it is installed.

It needs CUDA tensors in fp16 or bf16 and works in (B, T, H, D) layout, so we transpose
views in and out (no copies unless the input is not contiguous in the last dim).
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_func, flash_attn_varlen_func  # ImportError: the registry says it is absent


def unsupported(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> str | None:
    if q.device.type != "cuda":
        return f"flash_attn runs only on CUDA tensors, got {q.device}; use backend 'sdpa' or 'torch'"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn supports only float16 and bfloat16, got {q.dtype}; use backend 'sdpa'"
    d = q.shape[-1]
    if d > 256 or d % 8:
        return f"flash_attn supports head_dim a multiple of 8 up to 256, got {d}"
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    if cu_seqlens is not None:
        return _varlen(q, k, v, dropout_p, scale, cu_seqlens)
    # flash-attn >= 2.1 aligns the causal mask bottom-right, as our interface does
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=causal,
    )
    return out.transpose(1, 2)


def _varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Packed documents through ``flash_attn_varlen_func``: the rows are flattened into one
    (B * T) token axis, and every row boundary is added to the document offsets."""
    b, h, t, d = q.shape
    rows = torch.arange(0, b * t + 1, t, device=q.device, dtype=torch.int32)
    cu = torch.unique(torch.cat([cu_seqlens.to(torch.int32), rows]))  # sorted, as flash-attn needs
    flat = [x.transpose(1, 2).reshape(b * t, h, d) for x in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, t, t, dropout_p=dropout_p, softmax_scale=scale, causal=True)
    return out.view(b, t, h, d).transpose(1, 2)
