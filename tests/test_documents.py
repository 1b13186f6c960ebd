"""Packed documents (``cu_seqlens``): causal inside each document, nothing across documents,
through every backend that takes them, against each document run on its own in float64."""

from __future__ import annotations

import pytest
import torch

from gptforge import kernels
from gptforge.kernels import reference
from gptforge.kernels.documents import document_starts

# (B, T, document offsets in the flattened B * T axis): boundaries on and off row edges,
# documents of one token, many short ones, one filling a row, one running past its row
CASES = [
    (1, 8, [0, 8]),
    (1, 9, [0, 1, 2, 3, 9]),
    (2, 10, [0, 3, 4, 12, 20]),
    (2, 7, [0, 7, 14]),
    (3, 5, [0, 2, 4, 6, 8, 10, 11, 15]),
]
BACKENDS = ["torch", "sdpa"]


def separately(q, k, v, batch: int, seq_len: int, offsets: list[int]) -> torch.Tensor:
    """Each document (cut at row edges) through plain causal attention in float64, on its own."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        cuts = sorted({0, seq_len, *(o - b * seq_len for o in offsets if b * seq_len < o < (b + 1) * seq_len)})
        for s0, s1 in zip(cuts, cuts[1:], strict=False):
            piece = [x[b : b + 1, :, s0:s1].double() for x in (q, k, v)]
            out[b, :, s0:s1] = reference.attention(*piece, causal=True, dropout_p=0.0, scale=q.shape[-1] ** -0.5)[0]
    return out


def test_document_starts_restart_at_every_boundary_and_row():
    starts = document_starts(torch.tensor([0, 3, 4, 12, 20]), 2, 10)
    assert starts.tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 4, 4], [0, 0, 2, 2, 2, 2, 2, 2, 2, 2]]
    assert starts.dtype == torch.int32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,offsets", CASES)
def test_packed_documents_match_each_document_alone(backend, dtype, batch, seq_len, offsets):
    torch.manual_seed(len(offsets) * 100 + seq_len)
    q, k, v = (torch.randn(batch, 2, seq_len, 16).to(dtype).requires_grad_() for _ in range(3))
    cu = torch.tensor(offsets, dtype=torch.int32)
    out = kernels.attention(q, k, v, causal=True, backend=backend, cu_seqlens=cu)
    want = separately(q, k, v, batch, seq_len, offsets)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    want_grads = torch.autograd.grad(separately(qd, kd, vd, batch, seq_len, offsets).square().sum(), (qd, kd, vd))
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=tol * 5, atol=tol * 5)


def test_one_document_per_row_is_plain_causal_attention():
    q, k, v = (torch.randn(3, 2, 12, 8) for _ in range(3))
    rows = torch.tensor([0, 12, 24, 36])
    torch.testing.assert_close(kernels.attention(q, k, v, cu_seqlens=rows), kernels.attention(q, k, v))


@pytest.mark.parametrize("cu,message", [
    (torch.tensor([0, 3, 19]), "rise strictly from 0 to B \\* T = 20"),
    (torch.tensor([1, 20]), "rise strictly from 0"),
    (torch.tensor([0, 5, 5, 20]), "documents of at least one token"),
    (torch.tensor([0.0, 20.0]), "1-D int32 or int64"),
    (torch.tensor([[0, 20]]), "1-D int32 or int64"),
    ([0, 20], "must be a torch.Tensor"),
])  # fmt: skip
def test_bad_offsets_are_one_clear_error(cu, message):
    q = torch.randn(2, 1, 10, 8)
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, q, q, cu_seqlens=cu)


def test_packed_documents_need_a_causal_square_attention():
    q, cu = torch.randn(1, 1, 6, 8), torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match="causal=True"):
        kernels.attention(q, q, q, causal=False, cu_seqlens=cu)
    with pytest.raises(ValueError, match="as many queries as keys"):
        kernels.attention(q[:, :, :4], q, q, cu_seqlens=cu)
