"""Parity of every linear_cross_entropy backend (torch, chunked, triton) with a float64 reference.

The Triton backend runs under Triton's interpreter without a GPU (tests/conftest.py). Every case
draws fresh random inputs, poisons the buffers the Triton launchers allocate with NaN, and
compares the loss and the gradients of hidden and weight with ``F.cross_entropy`` on float64
copies. The dhidden buffers the chunked and triton backends fill start as NaN, so a row left
unwritten fails. Shapes are small (the interpreter is slow); the vocabulary tile and the chunk sizes are
lowered so that a few hundred classes and a few dozen rows still cross several tiles and chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptforge import kernels
from gptforge.kernels import chunked_cross_entropy as chunked

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
BACKENDS = ["torch", "chunked", "triton"]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Several vocabulary tiles and several chunks even at test sizes; NaN-poisoned buffers."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 300 * 7)  # 7 rows of 300 fp32 logits per chunk
    monkeypatch.setattr(chunked, "POISON_OUTPUTS", True)  # dhidden starts as NaN: every row must be written
    try:
        from gptforge.kernels.triton import common
        from gptforge.kernels.triton import linear_cross_entropy as lce
        from gptforge.kernels.triton import linear_cross_entropy_kernels as lce_kernels
    except ImportError:
        return
    monkeypatch.setattr(lce_kernels, "MAX_BLOCK_V", 128)
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def needs(backend: str) -> None:
    if backend not in kernels.available_backends("linear_cross_entropy", DEVICE):
        pytest.skip(f"linear_cross_entropy backend {backend!r} cannot run on {DEVICE} here")


def leaf(shape, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def reference(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """float64 loss and gradients, the mean over the rows not ignored (0 when there are none)."""
    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logits = h64.reshape(-1, h64.shape[-1]) @ w64.t()
    loss = F.cross_entropy(logits, targets.cpu().reshape(-1).long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / max(1, int((targets != ignore_index).sum()))
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    atol = tol * max(1e-3, expected.abs().max().item())
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def run_case(backend, dtype, n_rows, n_embd, vocab, ignored=0.0, shape3d=False, reduction="mean"):
    needs(backend)
    shape = (2, n_rows // 2, n_embd) if shape3d else (n_rows, n_embd)
    hidden = leaf(shape, dtype, scale=2.0)
    weight = leaf((vocab, n_embd), dtype, scale=0.5)
    targets = torch.randint(0, vocab, shape[:-1], device=DEVICE)
    targets[torch.rand(shape[:-1], device=DEVICE) < ignored] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
    dloss = torch.rand((), device=DEVICE) + 0.5  # not 1: the backward must scale by it
    (loss * dloss).backward()
    loss64, dh64, dw64 = reference(hidden, weight, targets, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    check(loss, loss64, dtype, f"{backend} loss")
    check(hidden.grad, dh64 * dloss.item(), dtype, f"{backend} dhidden")
    check(weight.grad, dw64 * dloss.item(), dtype, f"{backend} dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, dtype):
    """A vocabulary that is no multiple of the tile (300 = 2 * 128 + 44), ragged chunks, some
    rows at ignore_index, a (B, T, C) input."""
    run_case(backend, dtype, n_rows=38, n_embd=40, vocab=300, ignored=0.25, shape3d=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_and_sum(backend):
    run_case(backend, torch.float32, n_rows=1, n_embd=16, vocab=129)
    run_case(backend, torch.float32, n_rows=20, n_embd=24, vocab=200, ignored=0.3, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero(backend):
    """F.cross_entropy's mean would be NaN; ours is 0 with zero (finite) gradients."""
    needs(backend)
    hidden, weight = leaf((9, 16), torch.float32), leaf((130, 16), torch.float32)
    targets = torch.full((9,), -100, device=DEVICE)
    loss = kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ignore_index(backend):
    needs(backend)
    hidden, weight = leaf((12, 16), torch.float32), leaf((140, 16), torch.float32)
    targets = torch.randint(0, 140, (12,), device=DEVICE)
    targets[::3] = 7  # a real class id used as the ignore_index
    loss = kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=7, backend=backend)
    loss.backward()
    loss64, dh64, dw64 = reference(hidden, weight, targets, ignore_index=7)
    check(loss, loss64, torch.float32, "loss")
    check(hidden.grad, dh64, torch.float32, "dhidden")
    check(weight.grad, dw64, torch.float32, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_head_adds_the_embedding_gradient(backend):
    """The weight shared with an embedding gets both gradients, summed."""
    needs(backend)
    vocab, n_embd = 150, 24
    emb = torch.nn.Embedding(vocab, n_embd).to(DEVICE)
    idx = torch.randint(0, vocab, (3, 8), device=DEVICE)
    targets = torch.randint(0, vocab, (3, 8), device=DEVICE)
    emb.weight.grad = None
    hidden = torch.tanh(emb(idx))
    kernels.linear_cross_entropy(hidden, emb.weight, targets, backend=backend).backward()

    w64 = emb.weight.detach().cpu().double().requires_grad_()
    h64 = torch.tanh(F.embedding(idx.cpu(), w64))
    F.cross_entropy((h64 @ w64.t()).reshape(-1, vocab), targets.cpu().reshape(-1)).backward()
    check(emb.weight.grad, w64.grad, torch.float32, "tied weight's gradient")


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_grad_and_frozen_weight(backend):
    """Without grad mode no gradient work is done; a frozen weight gets no gradient."""
    needs(backend)
    hidden, weight = leaf((10, 16), torch.float32), torch.randn(130, 16, device=DEVICE)
    targets = torch.randint(0, 130, (10,), device=DEVICE)
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss64, dh64, _ = reference(hidden, weight, targets)
    check(loss, loss64, torch.float32, "loss without grad")
    kernels.linear_cross_entropy(hidden, weight, targets, backend=backend).backward()
    check(hidden.grad, dh64, torch.float32, "dhidden with a frozen weight")
    assert weight.grad is None


def test_autocast_casts_like_a_linear():
    """Under autocast hidden and weight are cast to its dtype; gradients return to fp32 leaves."""
    hidden, weight = leaf((6, 16), torch.float32), leaf((130, 16), torch.float32)
    targets = torch.randint(0, 130, (6,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(hidden, weight, targets, backend="chunked")
    loss.backward()
    loss64, dh64, dw64 = reference(hidden.bfloat16(), weight.bfloat16(), targets)
    check(loss, loss64, torch.bfloat16, "loss under autocast")
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    check(weight.grad, dw64, torch.bfloat16, "dweight under autocast")


def test_bad_inputs_raise_value_error():
    h, w, t = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    cases = {
        "hidden 1-D": lambda: kernels.linear_cross_entropy(h[0], w, t[:1]),
        "hidden 4-D": lambda: kernels.linear_cross_entropy(h[None, None], w, t[None, None]),
        "weight wrong width": lambda: kernels.linear_cross_entropy(h, w[:, :7], t),
        "weight 1-D": lambda: kernels.linear_cross_entropy(h, w[0], t),
        "targets wrong shape": lambda: kernels.linear_cross_entropy(h, w, t[:3]),
        "targets float": lambda: kernels.linear_cross_entropy(h, w, t.float()),
        "targets not a tensor": lambda: kernels.linear_cross_entropy(h, w, [0, 1, 2, 3]),
        "dtype mismatch": lambda: kernels.linear_cross_entropy(h, w.double(), t),
        "integer hidden": lambda: kernels.linear_cross_entropy(t[:, None].expand(4, 8), w, t),
        "device mismatch": lambda: kernels.linear_cross_entropy(h, w.to("meta"), t),
        "empty": lambda: kernels.linear_cross_entropy(h[:0], w, t[:0]),
        "bad reduction": lambda: kernels.linear_cross_entropy(h, w, t, reduction="none"),
        "ignore_index float": lambda: kernels.linear_cross_entropy(h, w, t, ignore_index=-100.0),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{what} did not raise")
    with pytest.raises(kernels.BackendError):
        kernels.linear_cross_entropy(h, w, t, backend="no_such_backend")


def test_backend_selection():
    assert kernels.selected("linear_cross_entropy") in ("auto", "chunked", "torch", "triton")
    assert {"torch", "chunked"} <= set(kernels.available_backends("linear_cross_entropy"))
    with kernels.use_backend(linear_cross_entropy="torch"):
        assert kernels.selected("linear_cross_entropy") == "torch"


# --- the Triton backend's custom op, torch.compile and AOT specs ------------------------------


def _triton_op():
    needs("triton")
    from gptforge.kernels.triton import linear_cross_entropy as lce

    return lce.linear_cross_entropy_fwd


def test_custom_ops_pass_opcheck():
    op = _triton_op()
    hidden, weight = leaf((10, 16), torch.float32), leaf((140, 16), torch.float32)
    targets = torch.randint(0, 140, (10,), device=DEVICE)
    targets[0] = -100
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (hidden, weight, targets, -100, True, True, True), test_utils=tests)
    torch.library.opcheck(
        chunked.chunked_linear_cross_entropy, (hidden, weight, targets, -100, False, True, False), test_utils=tests
    )


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_torch_compile_fullgraph_no_recompile(backend):
    """One graph (no break) through the custom op and its backward, and no recompile when the
    inputs change values (fresh tensors, same shapes)."""
    needs(backend)
    from torch._dynamo.utils import counters

    def loss_fn(h, w, t):
        return kernels.linear_cross_entropy(torch.tanh(h), w, t, backend=backend) * 2.0

    hidden, weight = leaf((2, 5, 16), torch.float32), leaf((140, 16), torch.float32)
    targets = torch.randint(0, 140, (2, 5), device=DEVICE)
    eager = loss_fn(hidden, weight, targets)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, weight, targets)
    grads = torch.autograd.grad(out, (hidden, weight))
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    for _ in range(2):  # new values, same shapes: the graph is reused
        h2 = leaf((2, 5, 16), torch.float32)
        compiled(h2, weight, torch.randint(0, 140, (2, 5), device=DEVICE)).backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"], (counters["recompiles"], counters["graph_break"])


def test_aot_specs_cover_the_kernel():
    pytest.importorskip("triton")
    from gptforge.kernels import aot_specs

    specs = [s for s in aot_specs.all_specs() if s["name"].startswith("linear_cross_entropy")]
    assert {s["signature"]["LOGITS"] for s in specs} == {"*fp32", "*fp16", "*bf16"}
    for spec in specs:
        assert set(spec["signature"]) | set(spec["constexprs"]) == set(spec["fn"].arg_names), spec["name"]
