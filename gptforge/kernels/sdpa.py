"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch picks its fastest implementation for the device (FlashAttention or memory-efficient
kernels on CUDA, a fused flash kernel on the CPU). Runs everywhere PyTorch does.

On the CPU, a bf16/fp16 attention that autograd will differentiate runs in fp32: the CPU flash
kernel's half-precision backward is several times slower than its fp32 one (torch 2.13, 2-core
Xeon: 4.95 against 0.81 ms forward+backward at B=12, H=4, T=64, D=32; 42.6 against 7.9 ms at
T=128; at D=64 fp32 still wins 4 shapes in 5), and the casts cost far less than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptforge.kernels.documents import document_mask, document_starts
from gptforge.kernels.reference import no_autocast


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and _needs_grad(q, k, v):
        return attention(q.float(), k.float(), v.float(), causal, dropout_p, scale, cu_seqlens).to(q.dtype)
    t_q, t_k = q.shape[-2], k.shape[-2]
    with no_autocast(q.device.type):  # compute in the input dtype
        if cu_seqlens is not None:  # packed documents: a block-diagonal causal mask
            mask = document_mask(document_starts(cu_seqlens, q.shape[0], t_q))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        if not causal or t_q == t_k or t_q == 1:  # one query (decoding against a cache) sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and t_q > 1,
                                                  scale=scale)
        if t_q < t_k:  # bottom-right aligned mask: query i sees keys j <= i + (Tk - Tq)
            # an explicit mask, not torch.nn.attention.bias.causal_lower_right: importing that
            # module pulls in torch._dynamo, 1.3 s of every start-up, for this rare case
            mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        # t_q > t_k: the first Tq - Tk queries see no key (zeros); the rest are square-causal
        seen = F.scaled_dot_product_attention(
            q[..., t_q - t_k :, :], k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
        return torch.cat([seen.new_zeros(*q.shape[:-2], t_q - t_k, v.shape[-1]), seen], dim=-2)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
