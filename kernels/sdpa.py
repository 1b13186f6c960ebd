"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch picks its fastest implementation for the device (FlashAttention or memory-efficient
kernels on CUDA, a fused flash kernel on the CPU). Runs everywhere PyTorch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import no_autocast


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float
) -> torch.Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    with no_autocast(q.device.type):  # compute in the input dtype
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
