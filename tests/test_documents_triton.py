"""Packed documents through the triton attention kernels (Triton's interpreter on a CPU): forward
and gradients against each document run on its own in float64, in every variant and dtype,
with boundaries on and off the tiles' edges; dropout draws the unpacked kernel's mask.

The interpreter's tiles are 32 x 16 (forward, dQ) and 16 x 32 (dK/dV) (configs.INTERPRET_CONFIG):
offsets that are multiples of 16 or 32 sit on tile edges, the others cut through tiles.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from gptforge import kernels
from gptforge.kernels import reference
from gptforge.kernels.documents import document_mask, document_starts
from gptforge.kernels.triton import common, configs
from gptforge.kernels.triton.attention_backward import document_ends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (B, T, document offsets over the flattened B * T axis)
ON_EDGES = (1, 64, [0, 16, 32, 48, 64])  # every boundary on a tile edge
OFF_EDGES = (1, 45, [0, 1, 2, 19, 20, 37, 45])  # documents of one token, boundaries inside tiles
SHORT = (1, 50, [0, 3, 4, 9, 11, 12, 17, 20, 26, 27, 31, 33, 38, 41, 42, 47, 50])  # many short documents
FULL_ROW = (2, 37, [0, 37, 40, 74])  # one document filling a row (T not a multiple of a tile); one of 3 + 34
ACROSS_ROWS = (2, 40, [0, 25, 60, 80])  # a document cut at the row edge
CASES = {"on_edges": ON_EDGES, "off_edges": OFF_EDGES, "short": SHORT, "full_row": FULL_ROW, "across": ACROSS_ROWS}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _inputs(batch, seq_len, dim, dtype, heads=2):
    g = torch.Generator().manual_seed(zlib.crc32(repr((batch, seq_len, dim, dtype)).encode()))
    make = lambda: torch.randn(batch, heads, seq_len, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    return make(), make(), make(), torch.randn(batch, heads, seq_len, dim, generator=g).to(DEVICE, dtype)


def _separately(q, k, v, do, offsets):
    """Output and gradients of each document (cut at row edges) run alone, in float64 on the CPU."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    batch, seq_len = q.shape[0], q.shape[2]
    rows = []
    for b in range(batch):
        cuts = sorted({0, seq_len, *(o - b * seq_len for o in offsets if b * seq_len < o < (b + 1) * seq_len)})
        pieces = [
            reference.attention(q64[b : b + 1, :, s0:s1], k64[b : b + 1, :, s0:s1], v64[b : b + 1, :, s0:s1],
                                True, 0.0, q.shape[-1] ** -0.5)
            for s0, s1 in zip(cuts, cuts[1:], strict=False)
        ]  # fmt: skip
        rows.append(torch.cat(pieces, dim=2))
    out = torch.cat(rows)
    out.backward(do.cpu().double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _assert_close(name, actual, expected, dtype):
    actual = actual.detach().cpu().double()
    assert not actual.isnan().any(), f"{name}: NaN in the result (an unwritten or poisoned element?)"
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item() / scale
    assert err <= TOL[dtype], f"{name}: max error {err:.2e} (relative to max |ref| {scale:.2e}) > {TOL[dtype]:.0e}"


def _check(case, dtype, dim=16):
    batch, seq_len, offsets = case
    q, k, v, do = _inputs(batch, seq_len, dim, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    out = kernels.attention(q, k, v, causal=True, backend="triton", cu_seqlens=cu)
    grads = torch.autograd.grad(out, (q, k, v), do)
    expected = _separately(q, k, v, do, offsets)
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), expected, strict=True):
        _assert_close(name, actual, ref, dtype)


def test_document_ends_follow_the_starts():
    starts = document_starts(torch.tensor([0, 3, 4, 12, 20]), 2, 10)
    ends = document_ends(starts)
    assert ends.tolist() == [[3, 3, 3, 4, 10, 10, 10, 10, 10, 10], [2, 2, 10, 10, 10, 10, 10, 10, 10, 10]]
    assert ends.dtype == torch.int32


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_parity_fp32(case):
    _check(CASES[case], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["off_edges", "full_row"], ids=str)
def test_parity_16_bit(case, dtype):
    _check(CASES[case], dtype)


@pytest.mark.parametrize("variant", [v for v in configs.VARIANTS if v != "today"])
def test_parity_in_every_variant(variant):
    with configs.force_variant(variant):
        _check(OFF_EDGES, torch.bfloat16)


def test_other_tile_shapes(monkeypatch):
    """Key tiles larger than query tiles in the forward and dQ, the other way round in dK/dV."""
    monkeypatch.setattr(configs, "INTERPRET_CONFIG", {"fwd": (16, 32), "bwd_dkdv": (32, 16), "bwd_dq": (16, 32)})
    _check(SHORT, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_parity_full_grid(case, dtype, dim):
    _check(CASES[case], dtype, dim)


# --------------------------------------------------------------------------------------------
# Dropout: the (batch*head, query, key) Philox counters of the unpacked kernel
# --------------------------------------------------------------------------------------------


def _kept(q, k, cu, p, seed):
    """The keep-mask of one call, read through a one-hot V (D >= T): where kept, output column
    j is P_ij / (1 - p), else 0. Only entries the call's mask lets through say anything."""
    batch, heads, seq_len, dim = q.shape
    v = torch.eye(seq_len, dim).expand(batch, heads, seq_len, dim).to(DEVICE)
    torch.manual_seed(seed)
    out = kernels.attention(q, k, v, causal=True, dropout_p=p, backend="triton", cu_seqlens=cu)
    return out.detach().cpu()[..., :seq_len] != 0


def test_dropout_mask_is_the_unpacked_kernels():
    """One document per row draws exactly the plain causal kernel's mask; several documents
    draw that same mask, cut to each document's block."""
    batch, seq_len, dim, p = 1, 48, 64, 0.3
    q, k = (torch.randn(batch, 2, seq_len, dim, device=DEVICE) for _ in range(2))
    plain = _kept(q, k, None, p, seed=11)
    whole = _kept(q, k, torch.tensor([0, seq_len], dtype=torch.int32, device=DEVICE), p, seed=11)
    assert torch.equal(whole, plain)
    cu = torch.tensor([0, 1, 17, 30, 31, 48], dtype=torch.int32, device=DEVICE)
    visible = document_mask(document_starts(cu.cpu(), batch, seq_len))
    packed = _kept(q, k, cu, p, seed=11)
    assert torch.equal(packed, plain & visible)
    assert 0.6 < packed.sum().item() / visible.expand_as(packed).sum().item() < 0.8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_gradients_use_the_forward_mask(dtype):
    """Several documents and dropout: the same seed gives the same output, and output and
    gradients match a float64 reference that applies the recovered mask and the documents."""
    batch, seq_len, dim, p, seed = 1, 45, 64, 0.25, 5
    offsets = OFF_EDGES[2]
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    q, k, v, do = _inputs(batch, seq_len, dim, dtype)
    kept = _kept(q.detach().float(), k.detach().float(), cu, p, seed)
    torch.manual_seed(seed)
    out = kernels.attention(q, k, v, causal=True, dropout_p=p, backend="triton", cu_seqlens=cu)
    torch.manual_seed(seed)
    again = kernels.attention(q, k, v, causal=True, dropout_p=p, backend="triton", cu_seqlens=cu)
    assert torch.equal(out, again)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    att = (q64 @ k64.transpose(-2, -1)) * dim**-0.5
    att = att.masked_fill(~document_mask(document_starts(cu.cpu(), batch, seq_len)), float("-inf"))
    want = (torch.softmax(att, dim=-1) * kept.double() / (1 - p)) @ v64
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.cpu().double())
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads), strict=True):
        _assert_close(name, actual, ref.detach(), dtype)


# --------------------------------------------------------------------------------------------
# The custom op under torch.compile
# --------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_with_documents():
    q, k, v, do = _inputs(1, 40, 16, torch.float32)
    cu = torch.tensor([0, 7, 23, 40], dtype=torch.int32, device=DEVICE)

    def f(q, k, v, cu):
        return kernels.attention(q, k, v, causal=True, backend="triton", cu_seqlens=cu) * 2.0

    eager = f(q, k, v, cu)
    try:
        out = torch.compile(f, fullgraph=True)(q, k, v, cu)
    except Exception as err:  # noqa: BLE001
        if "C++ compiler" in str(err) or "CppCompileError" in type(err).__name__:
            pytest.skip(f"torch.compile's CPU backend needs a working C++ compiler here: {err}")
        raise
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(eager, (q, k, v), do), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_custom_op_with_starts_passes_opcheck():
    q, k, v, _ = _inputs(1, 9, 16, torch.float32, heads=1)
    starts = document_starts(torch.tensor([0, 4, 9], device=DEVICE), 1, 9)
    torch.library.opcheck(
        torch.ops.gpt_kernels.flash_attention_fwd.default,
        (q, k, v, True, 0.0, 0.25, None, starts),
        test_utils=("test_schema", "test_faketensor"),
    )
