"""The ``flash_attn`` backend: Dao-AILab's FlashAttention 2 package, where it is installed.

It needs CUDA tensors in fp16 or bf16 and works in (B, T, H, D) layout, so we transpose
views in and out (no copies unless the input is not contiguous in the last dim).
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_func  # ImportError here tells the registry it is absent


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float
) -> torch.Tensor:
    # flash-attn >= 2.1 aligns the causal mask bottom-right, as our interface does
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=causal,
    )
    return out.transpose(1, 2)
