"""Packed documents: several documents in one row of a batch, each attending only to itself.

The interface takes cumulative sequence lengths, as ``flash_attn_varlen_func`` does:
``cu_seqlens`` (int32 or int64, shape (N + 1,)) holds the offsets of N documents in the
flattened (B * T) token axis, from 0 to B * T. A row boundary always ends a document (rows
are separate sequences), so a document that runs past the end of its row is cut there.

The backends work from ``document_starts``: for every position, where its document begins
within its row. Query i then sees key j when ``starts[i] <= j <= i``.
"""

from __future__ import annotations

import torch


def document_starts(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """(B, T) int32: the position within its row at which each token's document begins."""
    pos = torch.arange(batch * seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    which = torch.searchsorted(cu_seqlens, pos, right=True) - 1  # the document holding each token
    row_start = pos - pos % seq_len
    return (torch.maximum(cu_seqlens[which], row_start) - row_start).view(batch, seq_len).to(torch.int32)


def document_mask(starts: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may see key j: ``starts[i] <= j <= i``."""
    t = starts.shape[-1]
    j = torch.arange(t, device=starts.device)
    i = j[:, None]
    return ((j[None, :] <= i) & (j[None, None, :] >= starts[:, :, None]))[:, None]


def check_cu_seqlens(cu_seqlens: object, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    """A ValueError that says what was expected, for a malformed ``cu_seqlens``. Its values
    (0 first, B * T last, increasing) are checked on the CPU only: on a GPU the check would
    cost a device synchronisation in every layer of every step; under torch.compile, where
    reading a value would stop the trace, they are not checked either."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 or int64 tensor of N + 1 document offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; they must share a device")
    if not causal:
        raise ValueError("packed documents (cu_seqlens) are causal within each document: pass causal=True")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"packed documents need as many queries as keys, got Tq={q.shape[-2]}, Tk={k.shape[-2]}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        total = q.shape[0] * q.shape[-2]
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((steps <= 0).any()):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to B * T = {total} (documents of at least "
                             f"one token), got {cu_seqlens.tolist()[:8]}{' ...' if cu_seqlens.numel() > 8 else ''}")
