"""Packed documents in a batch: where they begin, and each token's position inside its own.

Prepared data separates documents with the tokenizer's end-of-text token (``eot_id``): a
document ENDS with its eot, so the next one starts at the position after it. A training
window of T tokens is cut from that stream anywhere, so one row holds the tail of one
document, maybe whole ones, and the head of another. With the document mask on
(``--document_mask=true``) the model attends within each document only, and its positions
restart at each document's first token, as if every document were run alone.

The documents travel as ``cu_seqlens``, as ``flash_attn_varlen_func`` takes them: int32
offsets of the N documents in the flattened (B * T) token axis, from 0 to B * T (see
gptforge/kernels/documents.py). Row starts always begin a document: rows are separate
sequences, and a document cut by the window starts (for this batch) at its row's start.
"""

from __future__ import annotations

import torch

from gptforge.kernels import document_starts


def cu_seqlens_from_eot(idx: torch.Tensor, eot: int) -> torch.Tensor:
    """int32 (N + 1,) document offsets of the token ids ``idx`` (B, T): a document starts at
    each row's start and after each ``eot`` that is not its row's last token.

    ``torch.nonzero`` decides N, so on a GPU this waits for the device once: call it on the
    CPU batch before it is copied over (the training loop does), not in the model.
    """
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape (B, T), got {tuple(idx.shape)}")
    B, T = idx.shape
    starts = torch.empty_like(idx, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = idx[:, :-1] == eot  # the token after an eot begins the next document
    offsets = starts.view(-1).nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_full((1,), B * T)]).to(torch.int32)


def document_positions(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """(B, T) int64: each token's position within its own document (0 at every document's
    first token), for the position embeddings of packed documents."""
    pos = torch.arange(seq_len, device=cu_seqlens.device)
    return pos - document_starts(cu_seqlens, batch, seq_len).long()
