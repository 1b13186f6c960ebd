"""Parity of the ``triton`` LayerNorm backend (gptforge/kernels/triton/layer_norm*.py) with a float64 reference.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Every case draws fresh random inputs, fills every buffer the kernels allocate with NaN first (so an
element left unwritten fails), and compares forward, dx, dweight and dbias with torch's LayerNorm
on float64 CPU copies. The default run covers every shape, dtype and weight/bias option without
their full product; the full grid is marked ``slow``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gptforge import kernels

triton = pytest.importorskip("triton")
ln = pytest.importorskip("gptforge.kernels.triton.layer_norm")
from gptforge.kernels import aot_specs  # noqa: E402 -- after the importorskip: both import triton
from gptforge.kernels.triton import common, configs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 7), (2, 128, 512), (5, 123, 123), (4, 64, 1600), (2, 8, 4096), (1, 16384)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]  # (has weight, has bias)
OFFSETS = [0.0, 1e3]  # 1e3: rows whose mean dwarfs their spread
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch):
    """Every output and partial-sum buffer the kernels allocate starts as NaN."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def reference_layer_norm(x64, weight64, bias64, eps):
    """LayerNorm in float64 (kernels.reference.layer_norm computes in float32, even for float64 input)."""
    return F.layer_norm(x64, x64.shape[-1:], weight64, bias64, eps)


def fresh(shape, dtype, offset=0.0, scale=1.0, requires_grad=True) -> torch.Tensor:
    t = (torch.randn(shape, device=DEVICE) * scale + offset).to(dtype)
    return t.requires_grad_(requires_grad)


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Relative tolerance per element, plus an absolute floor scaled to the tensor's magnitude
    (sums like dweight cancel down to values near zero). NaN never passes."""
    tol = TOL[dtype]
    assert actual.shape == expected.shape, what
    atol = tol * max(1.0, expected.abs().max().item())
    actual = actual.detach().cpu().double()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def as_float64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().double().requires_grad_()


def params(n: int, affine: tuple[bool, bool], dtype: torch.dtype):
    has_weight, has_bias = affine
    weight = fresh(n, dtype, offset=1.0, scale=0.5) if has_weight else None
    bias = fresh(n, dtype, scale=0.5) if has_bias else None
    return weight, bias


def run_case(shape, dtype, affine, offset, param_dtype=None, eps=1e-5):
    """Forward and backward through kernels.layer_norm(backend="triton") against float64."""
    x = fresh(shape, dtype, offset=offset, scale=3.0)
    weight, bias = params(shape[-1], affine, param_dtype or dtype)
    y = kernels.layer_norm(x, weight, bias, eps=eps, backend="triton")
    dy = fresh(shape, dtype, requires_grad=False)
    y.backward(dy)

    x64, w64, b64 = as_float64_leaf(x), as_float64_leaf(weight), as_float64_leaf(bias)
    y64 = reference_layer_norm(x64, w64, b64, eps)
    y64.backward(dy.cpu().double())

    assert y.dtype == dtype and y.shape == x.shape
    check(y, y64, dtype, "y")
    check(x.grad, x64.grad, dtype, "dx")
    for name, p, p64 in (("dweight", weight, w64), ("dbias", bias, b64)):
        if p is not None:
            assert p.grad.dtype == p.dtype, f"{name} dtype"
            check(p.grad, p64.grad, p.dtype if p.dtype != torch.float32 else dtype, name)


# --- parity: every shape, dtype, affine option and offset, without the full product -----------


def _covering_cases():
    for (i, shape), (j, dtype) in itertools.product(enumerate(SHAPES), enumerate(DTYPES)):
        yield shape, dtype, AFFINE[(i + j) % len(AFFINE)], OFFSETS[(i + j) % len(OFFSETS)]


@pytest.mark.parametrize("shape, dtype, affine, offset", list(_covering_cases()), ids=str)
def test_layer_norm_parity(shape, dtype, affine, offset):
    run_case(shape, dtype, affine, offset)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, dtype, affine, offset", list(itertools.product(SHAPES, DTYPES, AFFINE, OFFSETS)), ids=str
)
def test_layer_norm_parity_full_grid(shape, dtype, affine, offset):
    run_case(shape, dtype, affine, offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_params_with_half_activations(dtype):
    """Autocast keeps fp32 parameters beside bf16/fp16 activations: y in x's dtype, grads in fp32."""
    run_case((3, 17, 96), dtype, (True, True), 0.0, param_dtype=torch.float32)


def test_under_autocast():
    x = fresh((4, 40), torch.bfloat16)
    weight, bias = params(40, (True, True), torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = kernels.layer_norm(x, weight, bias, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_eps_and_constant_rows(eps):
    """Constant rows (variance 0) give y = bias and finite gradients; eps reaches the kernel."""
    x = fresh((5, 33), torch.float32)
    with torch.no_grad():
        x[1] = 2.5
    run_x = x.detach().clone().requires_grad_()
    weight, bias = params(33, (True, True), torch.float32)
    y = kernels.layer_norm(run_x, weight, bias, eps=eps, backend="triton")
    y64 = reference_layer_norm(x.detach().double(), weight.detach().double(), bias.detach().double(), eps)
    check(y, y64, torch.float32, "y")
    y.sum().backward()
    assert torch.isfinite(run_x.grad).all()


# --- strided inputs --------------------------------------------------------------------------


STRIDED_VIEWS = {
    "row stride > N": lambda base: base[..., 3:67],  # (6, 10, 64), rows 80 elements apart
    "non-collapsible leading dims": lambda base: base[::2, 1::3, :64],
    "last dim not contiguous": lambda base: base.transpose(1, 2)[:, :64, :],  # (6, 64, 10), column stride 10
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", list(STRIDED_VIEWS))
def test_strided_input(view, dtype):
    """x and dy are strided views; gradients flow back into the tensor x is a view of."""
    base = fresh((6, 10, 80), dtype, scale=3.0)
    x = STRIDED_VIEWS[view](base)
    weight, bias = params(x.shape[-1], (True, True), dtype)
    y = kernels.layer_norm(x, weight, bias, backend="triton")
    dy = fresh(x.shape[:-1] + (2 * x.shape[-1],), dtype, requires_grad=False)[..., ::2]
    y.backward(dy)

    base64, w64, b64 = (as_float64_leaf(t) for t in (base, weight, bias))
    y64 = reference_layer_norm(STRIDED_VIEWS[view](base64), w64, b64, 1e-5)
    y64.backward(dy.cpu().double())
    check(y, y64, dtype, "y")
    check(base.grad, base64.grad, dtype, "dx")
    check(weight.grad, w64.grad, dtype, "dweight")
    check(bias.grad, b64.grad, dtype, "dbias")


# --- fused residual add ----------------------------------------------------------------------


def run_fused_case(shape, dtype, affine, offset):
    x = fresh(shape, dtype, offset=offset, scale=3.0)
    residual = fresh(shape, dtype, scale=3.0)
    weight, bias = params(shape[-1], affine, dtype)
    y, h = kernels.add_layer_norm(x, residual, weight, bias, backend="triton")
    dy = fresh(shape, dtype, requires_grad=False)
    dh = fresh(shape, dtype, requires_grad=False)  # h feeds the next residual branch too
    torch.autograd.backward([y, h], [dy, dh])

    # The same computation unfused: y is exactly the triton LayerNorm of the h it returns, and h is
    # x + residual rounded to x's dtype. (Triton's interpreter truncates fp32 -> bf16 casts where a
    # GPU rounds to nearest, so there a bf16 h may differ from torch's add in the last bit.)
    with torch.no_grad():
        assert torch.equal(y, kernels.layer_norm(h, weight, bias, backend="triton")), "y != layer_norm(h)"
        if dtype == torch.bfloat16 and common.INTERPRET:
            check(h, (x + residual).double(), dtype, "h vs x + residual")
        else:
            assert torch.equal(h, x + residual), "h differs from x + residual"

    # And against float64: add, then LayerNorm, differentiated through both outputs. The LayerNorm
    # takes h as returned (rounded to x's dtype), passing gradients straight through the rounding.
    x64, r64, w64, b64 = (as_float64_leaf(t) for t in (x, residual, weight, bias))
    h64 = x64 + r64
    h64 = h64 + (h.detach().cpu().double() - h64).detach()
    y64 = reference_layer_norm(h64, w64, b64, 1e-5)
    torch.autograd.backward([y64, h64], [dy.cpu().double(), dh.cpu().double()])
    check(y, y64.detach(), dtype, "y")
    check(h, h64, dtype, "h")
    check(x.grad, x64.grad, dtype, "dx")
    check(residual.grad, r64.grad, dtype, "dresidual")
    for name, p, p64 in (("dweight", weight, w64), ("dbias", bias, b64)):
        if p is not None:
            check(p.grad, p64.grad, dtype, name)


def _fused_cases():
    for (i, shape), (j, dtype) in itertools.product(enumerate(SHAPES), enumerate(DTYPES)):
        if (i + j) % 3 == 0 or shape == (1, 1):  # every shape and dtype, a third of the product
            yield shape, dtype, AFFINE[(i + 2 * j) % len(AFFINE)], OFFSETS[j % len(OFFSETS)]


@pytest.mark.parametrize("shape, dtype, affine, offset", list(_fused_cases()), ids=str)
def test_add_layer_norm_parity(shape, dtype, affine, offset):
    run_fused_case(shape, dtype, affine, offset)


@pytest.mark.slow
@pytest.mark.parametrize("shape, dtype, affine", list(itertools.product(SHAPES, DTYPES, AFFINE)), ids=str)
def test_add_layer_norm_parity_full_grid(shape, dtype, affine):
    run_fused_case(shape, dtype, affine, 1e3)


@pytest.mark.parametrize("x_dtype, residual_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_add_layer_norm_mixed_dtypes(x_dtype, residual_dtype):
    """Half activations added to an fp32 residual stream: h and y are fp32 (as x + residual
    is), and each input's gradient comes back in its own dtype."""
    x, residual = fresh((3, 5, 72), x_dtype, scale=3.0), fresh((3, 5, 72), residual_dtype, scale=3.0)
    weight, bias = params(72, (True, True), torch.float32)
    y, h = kernels.add_layer_norm(x, residual, weight, bias, backend="triton")
    assert y.dtype == h.dtype == torch.float32
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward([y, h], [dy, dh])
    assert x.grad.dtype == x_dtype and residual.grad.dtype == residual_dtype

    x64, r64, w64, b64 = (as_float64_leaf(t) for t in (x, residual, weight, bias))
    h64 = x64 + r64
    y64 = reference_layer_norm(h64, w64, b64, 1e-5)
    torch.autograd.backward([y64, h64], [dy.double(), dh.double()])
    check(h, h64.detach(), torch.float32, "h")
    check(y, y64.detach(), torch.float32, "y")
    check(x.grad, x64.grad, x_dtype if x_dtype != torch.float32 else residual_dtype, "dx")
    check(residual.grad, r64.grad, x_dtype if x_dtype != torch.float32 else residual_dtype, "dresidual")
    check(weight.grad, w64.grad, torch.float32, "dweight")
    check(bias.grad, b64.grad, torch.float32, "dbias")


@pytest.mark.parametrize(
    "shape, dtype",
    [((3, 5000), torch.bfloat16), ((2, 9001), torch.float32), ((3, 2, 12289), torch.float16)],
    ids=["row kernel + column sums", "long rows", "long rows, ragged last chunk"],
)
def test_long_row_paths(shape, dtype):
    """Rows past PARAM_GRADS_IN_ROW_KERNEL_MAX (column-sum kernel) and past MAX_BLOCK_N (chunked)."""
    assert shape[-1] > configs.PARAM_GRADS_IN_ROW_KERNEL_MAX
    run_case(shape, dtype, (True, True), 1e3)
    run_fused_case(shape, dtype, (True, False), 0.0)


def test_add_layer_norm_only_h_used():
    """When y is unused its gradient arrives as zeros; dx and dresidual are then exactly dh."""
    x, residual = fresh((3, 50), torch.float32), fresh((3, 50), torch.float32)
    weight, bias = params(50, (True, True), torch.float32)
    _, h = kernels.add_layer_norm(x, residual, weight, bias, backend="triton")
    dh = torch.randn_like(h)
    h.backward(dh)
    check(x.grad, dh.double(), torch.float32, "dx")
    check(residual.grad, dh.double(), torch.float32, "dresidual")


def test_layer_norm_module_with_residual():
    module = kernels.LayerNorm(48, backend="triton")
    x, residual = fresh((2, 5, 48), torch.float32), fresh((2, 5, 48), torch.float32)
    y, h = module(x, residual=residual)
    expected = torch.nn.functional.layer_norm((x + residual).double(), (48,), eps=1e-5)
    check(y, expected.detach(), torch.float32, "y")
    check(h, (x + residual).double().detach(), torch.float32, "h")


def test_edge_shapes():
    """A 1-D input is one row; an input with no rows gives empty outputs and zero parameter grads."""
    x = fresh((37,), torch.float32, offset=1e3, scale=3.0)
    weight, bias = params(37, (True, True), torch.float32)
    y = kernels.layer_norm(x, weight, bias, backend="triton")
    y.backward(torch.ones_like(y))
    x64, w64, b64 = (as_float64_leaf(t) for t in (x, weight, bias))
    reference_layer_norm(x64, w64, b64, 1e-5).backward(torch.ones(37, dtype=torch.float64))
    check(x.grad, x64.grad, torch.float32, "dx of a 1-D input")

    x = torch.randn(0, 3, 32, device=DEVICE, requires_grad=True)
    weight, bias = params(32, (True, True), torch.float32)
    y = kernels.layer_norm(x, weight, bias, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


# --- bad input and what the backend refuses ---------------------------------------------------


def test_bad_inputs_raise_value_error():
    x, r = fresh((4, 16), torch.float32), fresh((4, 16), torch.float32)
    w = torch.randn(16, device=DEVICE)
    cases = {
        "weight wrong size": lambda: kernels.layer_norm(x, torch.randn(15, device=DEVICE), backend="triton"),
        "bias wrong size": lambda: kernels.layer_norm(x, w, torch.randn(4, 16, device=DEVICE), backend="triton"),
        "eps zero": lambda: kernels.layer_norm(x, w, eps=0.0, backend="triton"),
        "eps negative": lambda: kernels.layer_norm(x, w, eps=-1e-5, backend="triton"),
        "weight on another device": lambda: kernels.layer_norm(x, w.to("meta"), backend="triton"),
        "residual on another device": lambda: kernels.add_layer_norm(x, r.to("meta"), backend="triton"),
        "residual wrong shape": lambda: kernels.add_layer_norm(x, r[:, :8], backend="triton"),
        "fused eps zero": lambda: kernels.add_layer_norm(x, r, w, eps=0.0, backend="triton"),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{what} did not raise")


def test_rows_too_long_is_a_backend_error():
    x = torch.randn(2, configs.MAX_N + 1, device=DEVICE)
    with pytest.raises(kernels.BackendError, match=str(configs.MAX_N)):
        kernels.layer_norm(x, backend="triton")
    assert ln.unsupported("layer_norm", torch.randn(2, configs.MAX_N, device=DEVICE), None, None, eps=1e-5) is None


def test_cpu_without_interpreter_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)  # what off_gpu_refusal reads
    x = torch.randn(2, 8)
    reason = ln.unsupported("layer_norm", x, None, None, eps=1e-5)
    assert reason is not None and "'torch'" in reason and "TRITON_INTERPRET" in reason
    with pytest.raises(kernels.BackendError, match="CUDA"):
        kernels.add_layer_norm(x, x, backend="triton")
    # auto never picks a backend that cannot run the call
    assert torch.allclose(kernels.layer_norm(x), F.layer_norm(x, (8,)))


# --- custom ops and torch.compile -------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real ops."""
    x, r = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    w, b = torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ln.layer_norm_fwd, (x.requires_grad_(), w.requires_grad_(), b, 1e-5), test_utils=tests)
    torch.library.opcheck(ln.add_layer_norm_fwd, (x, r, w, None, 1e-5), test_utils=tests)
    _, mean, rstd = ln.layer_norm_fwd(x.detach(), w.detach(), b, 1e-5)
    bwd_args = (torch.randn_like(x), x.detach(), w.detach(), mean, rstd, r, True, True)
    torch.library.opcheck(ln.layer_norm_bwd, bwd_args, test_utils=tests)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(compiler, monkeypatch, tmp_path):
    """Dynamo traces through the custom ops (fake implementations) and AOTAutograd through their
    registered backward; aot_eager then runs the real kernels. (inductor also works; slower.)"""
    # inductor's on-disk caches do not key on a custom op's schema: a graph cached before the
    # schema changed would be replayed with the old arguments. Start from an empty cache.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def block(x, residual, weight, bias):
        y, h = kernels.add_layer_norm(x, residual, weight, bias, backend="triton")
        return kernels.layer_norm(y * 2.0 + h, weight, None, backend="triton")

    # kernels.dispatch imports a backend module on its first use, and dynamo cannot trace an
    # import, so make sure it happened before compiling.
    kernels.layer_norm(torch.randn(1, 8, device=DEVICE), backend="triton")
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    x, residual = fresh((2, 6, 40), torch.float32), fresh((2, 6, 40), torch.float32)
    weight, bias = params(40, (True, True), torch.float32)
    leaves = (x, residual, weight, bias)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager_out = block(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), eager_leaves)
    check(out, eager_out.double().detach(), torch.float32, "compiled y")
    for name, g, e in zip(("dx", "dresidual", "dweight", "dbias"), grads, eager_grads, strict=True):
        check(g, e.double(), torch.float32, f"compiled {name}")


# --- ahead-of-time specs -----------------------------------------------------------------------


def test_aot_specs_cover_every_launch_config():
    specs = aot_specs.layer_norm_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        fn = spec["fn"]
        constexprs = set(spec["constexprs"])
        assert set(spec["signature"]) | constexprs == set(fn.arg_names), spec["name"]
        assert not set(spec["signature"]) & constexprs
        assert spec["num_warps"] in (1, 2, 4, 8, 16, 32) and spec["num_stages"] >= 1
    # the quick AOT check compiles the default subset: every kernel, both training dtypes
    defaults = {s["name"] for s in specs if s["default"]}
    assert {s["fn"] for s in specs if s["default"]} == {s["fn"] for s in specs}
    assert {"layer_norm_bwd_block_n1024_bf16_params_fp32", "layer_norm_fwd_long_rows_fp32_params_fp32"} <= defaults
    by_name = {s["name"]: s for s in specs}
    for n in (1, 7, 123, 768, 1600, 4096, 5000, 8192, 16384, configs.MAX_N):
        block_m, block_n, num_warps = configs.layer_norm_config(n)
        for kernel, ty in itertools.product(("fwd", "bwd"), ("fp32", "fp16", "bf16")):
            if block_n <= configs.MAX_BLOCK_N:
                spec = by_name[f"layer_norm_{kernel}_block_n{block_n}_{ty}_params_{ty}"]
                assert (spec["constexprs"]["BLOCK_M"], spec["num_warps"]) == (block_m, num_warps)
            else:
                assert f"layer_norm_{kernel}_long_rows_{ty}_params_{ty}" in by_name
            assert f"layer_norm_{kernel}_block_n{min(block_n, configs.MAX_BLOCK_N)}_{ty}_params_fp32" in by_name
    assert {"layer_norm_column_sums_fp32", "layer_norm_column_sums_bf16", "layer_norm_column_sums_fp16"} <= set(by_name)
    assert "layer_norm_fwd_block_n1024_bf16_residual_fp32_params_fp32" in by_name
