"""The ``torch`` backend: plain PyTorch, written to be read. Ground truth for every other backend.

Attention is the lecture's masked softmax, materialising the (Tq, Tk) score matrix; it runs
anywhere and supports anything, at the cost of O(T^2) memory. Both ops compute in fp32 with
autocast off (so accumulators stay fp32 whatever the caller's autocast says) and return the
input dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gptforge.kernels.documents import document_mask, document_starts


def causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may see key j: j <= i + (Tk - Tq).

    Aligned bottom-right as in FlashAttention, so the last query sees every key; equal
    lengths give the usual lower-triangular mask.
    """
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i + (t_k - t_q)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the enclosed ops. Entering ``torch.autocast`` costs microseconds, as
    much as a one-token attention step, so it is entered only when autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: half types are upcast, fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    with no_autocast(q.device.type):
        att = (_wide(q) @ _wide(k).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
        if cu_seqlens is not None:  # packed documents: causal inside each, nothing across
            att = att.masked_fill(~document_mask(document_starts(cu_seqlens, q.shape[0], q.shape[-2])), float("-inf"))
        elif causal:
            visible = causal_mask(q.shape[-2], k.shape[-2], q.device)
            att = att.masked_fill(~visible, float("-inf"))
        att = F.softmax(att, dim=-1)
        if causal and q.shape[-2] > k.shape[-2]:
            # the first Tq - Tk queries see no key: softmax gave NaN, FlashAttention gives 0
            att = att.nan_to_num(0.0)
        if dropout_p > 0.0:
            att = F.dropout(att, p=dropout_p, training=True)
        return (att @ _wide(v)).to(q.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    # no autocast guard needed: autocast runs layer_norm in fp32 already, as we do
    if x.dtype == torch.float32 and _is_fp32(weight) and _is_fp32(bias):  # the common case: no casts
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    x_wide = _wide(x)
    w = weight.to(x_wide.dtype) if weight is not None else None
    b = bias.to(x_wide.dtype) if bias is not None else None
    return F.layer_norm(x_wide, x.shape[-1:], w, b, eps).to(x.dtype)


def _is_fp32(param: torch.Tensor | None) -> bool:
    return param is None or param.dtype == torch.float32


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return layer_norm(h, weight, bias, eps), h


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """The loss with every logit materialised: (N, V) fp32 logits, then ``F.cross_entropy``.
    The mean divides by the number of rows not at ``ignore_index``, or by 1 when there are none
    (a loss of 0 with zero gradients, where ``F.cross_entropy``'s mean gives NaN)."""
    with no_autocast(hidden.device.type):
        logits = _wide(hidden) @ _wide(weight).t()  # (N, V)
        loss = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
        if reduction == "mean":
            loss = loss / (targets != ignore_index).sum().clamp(min=1)
        return loss
