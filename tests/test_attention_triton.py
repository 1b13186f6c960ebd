"""Parity of the ``triton`` attention backend (gptforge/kernels/triton/attention*.py) with a float64 reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py), which is slow,
so the default run covers the grid with a small design (30 cases) in which every sequence
length, head dim, dtype, causal flag, batch and head count appears, and every pair of
(T, D), (D, dtype), (T, causal), (causal, dtype); the full cartesian grid (480 cases) is marked
``slow`` (``pytest -m slow``). On a GPU both are cheap.

Every case draws fresh random inputs, poisons the kernels' output buffers with NaN (so an
element a kernel forgot to write fails), and compares the output and dq/dk/dv with
``gptforge.kernels.reference`` run in float64 on the CPU.

The kernels' variants (configs.VARIANTS: longest-first launch order, the tutorial's backward,
TMA tensor descriptors, and their combinations) are forced one at a time with
``configs.force_variant``: each passes a design of its own in the default run (every T, D,
dtype and causal flag, unequal lengths, dropout) and the covering design and full grid under
``slow``.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from gptforge import kernels
from gptforge.kernels import reference
from gptforge.kernels.triton import attention as triton_attention
from gptforge.kernels.triton import common, configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative to the largest reference magnitude; fp32 on a GPU uses tf32 dots
TOL = {torch.float32: 1e-3 if ON_GPU else 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SEQ_LENS = (1, 17, 64, 127, 257)
HEAD_DIMS = (16, 32, 64, 128)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _inputs(B, H, T_q, T_k, D, dtype):
    """Fresh random inputs per case, seeded by the case so a failure reproduces on its own."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((B, H, T_q, T_k, D, dtype)).encode()))
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, v = make(B, H, T_q, D), make(B, H, T_k, D), make(B, H, T_k, D)
    do = torch.randn(B, H, T_q, D, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def _reference(q, k, v, do, causal, scale, mask=None, dropout_p=0.0):
    """Output and (dq, dk, dv) in float64 on the CPU; ``mask`` applies a given dropout mask."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    if mask is None:
        out = reference.attention(q64, k64, v64, causal, 0.0, scale)
    else:
        att = (q64 @ k64.transpose(-2, -1)) * scale
        if causal:
            att = att.masked_fill(~reference.causal_mask(q.shape[-2], k.shape[-2], att.device), float("-inf"))
        att = torch.softmax(att, dim=-1).nan_to_num(0.0)
        out = (att * mask.cpu().double() / (1.0 - dropout_p)) @ v64
    out.backward(do.cpu().double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _assert_close(name, actual, expected, dtype):
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{name}: NaN in the result (an unwritten or poisoned element?)"
    # relative to the largest reference value, floored at 1: a gradient that is exactly 0 in
    # float64 (T = 1: softmax over one key is constant) comes out as rounding noise
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item() / scale
    assert err <= TOL[dtype], f"{name}: max error {err:.2e} (relative to max |ref| {scale:.2e}) > {TOL[dtype]:.0e}"


def _check(B, H, T_q, T_k, D, causal, dtype, transpose_inputs=False):
    q, k, v, do = _inputs(B, H, T_q, T_k, D, dtype)
    if transpose_inputs:  # the GPT layout: (B, T, H, D) storage seen as (B, H, T, D)
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
        assert not q.is_contiguous()
    scale = 1.0 / math.sqrt(D)
    out = kernels.attention(q, k, v, causal=causal, backend="triton")
    assert out.dtype == dtype and out.shape == (B, H, T_q, D)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    expected = _reference(q, k, v, do, causal, scale)
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected, strict=True):
        _assert_close(name, actual, ref, dtype)


# --------------------------------------------------------------------------------------------
# The grid: a covering design by default, the full product under the `slow` marker
# --------------------------------------------------------------------------------------------


def _covering_cases():
    """Two passes over the (T, dtype) pairs with the head dim and the causal flag rotating, so
    that every (T, D), (D, dtype), (T, causal) and (causal, dtype) pair shows up; B and H take
    both values."""
    cases = []
    for rotation in (0, 2):
        for i, ((t, T), (d, dtype)) in enumerate(itertools.product(enumerate(SEQ_LENS), enumerate(DTYPES))):
            D = HEAD_DIMS[(t + d + rotation) % 4]
            causal = (t + d + t // 2 + rotation // 2) % 2 == 0
            B, H = [(1, 3), (2, 1), (1, 1), (2, 3)][(i + rotation) % 4]
            if T * B * H * D > 257 * 128:
                B, H = 1, 1  # keep the largest shapes cheap under the interpreter
            cases.append((B, H, T, D, causal, dtype))
    return cases


def _case_id(case):
    B, H, T, D, causal, dtype = case
    return f"B{B}-H{H}-T{T}-D{D}-{'causal' if causal else 'full'}-{str(dtype).removeprefix('torch.')}"


COVERING = _covering_cases()
FULL = [
    (B, H, T, D, causal, dtype)
    for B, H, T, D, causal, dtype in itertools.product((1, 2), (1, 3), SEQ_LENS, HEAD_DIMS, (True, False), DTYPES)
]


def test_covering_design_covers_every_value():
    for position, values in enumerate(((1, 2), (1, 3), SEQ_LENS, HEAD_DIMS, (True, False), DTYPES)):
        assert {case[position] for case in COVERING} == set(values)
    assert {(c[3], c[5]) for c in COVERING} == set(itertools.product(HEAD_DIMS, DTYPES))
    assert {(c[4], c[5]) for c in COVERING} == set(itertools.product((True, False), DTYPES))
    assert {(c[2], c[4]) for c in COVERING} == set(itertools.product(SEQ_LENS, (True, False)))
    assert {(c[2], c[3]) for c in COVERING} == set(itertools.product(SEQ_LENS, HEAD_DIMS))


@pytest.mark.parametrize("case", COVERING, ids=_case_id)
def test_parity(case):
    B, H, T, D, causal, dtype = case
    _check(B, H, T, T, D, causal, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in FULL if c not in COVERING], ids=_case_id)
def test_parity_full_grid(case):
    B, H, T, D, causal, dtype = case
    _check(B, H, T, T, D, causal, dtype)


# Tq != Tk: the causal mask is aligned bottom-right (query i sees keys j <= i + Tk - Tq)
@pytest.mark.parametrize(
    "T_q, T_k, causal, D, dtype",
    [
        (1, 100, True, 64, torch.float32),  # decoding one token against a cache
        (1, 100, False, 32, torch.bfloat16),
        (37, 64, True, 16, torch.float16),
        (37, 64, False, 128, torch.float32),
        (64, 37, True, 32, torch.float32),  # Tq > Tk: the first 27 queries see no key -> 0, grads 0
        (100, 1, True, 64, torch.bfloat16),
        (40, 17, False, 64, torch.float16),
    ],
)
def test_parity_unequal_lengths(T_q, T_k, causal, D, dtype):
    _check(2, 3, T_q, T_k, D, causal, dtype)


def test_rows_without_keys_are_zero_with_zero_grads():
    q, k, v, do = _inputs(1, 2, 20, 5, 32, torch.float32)
    out = kernels.attention(q, k, v, causal=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.equal(out[:, :, :15], torch.zeros_like(out[:, :, :15]))
    assert torch.equal(dq[:, :, :15], torch.zeros_like(dq[:, :, :15]))
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    """(B, T, H, D) storage viewed as (B, H, T, D), as the GPT model produces it; no copies needed."""
    _check(2, 3, 45, 45, 32, True, dtype, transpose_inputs=True)


@pytest.mark.parametrize("blocks", [{"fwd": (16, 16), "bwd_dkdv": (16, 16), "bwd_dq": (16, 16)},
                                    {"fwd": (16, 64), "bwd_dkdv": (64, 16), "bwd_dq": (16, 32)}])  # fmt: skip
def test_other_tile_shapes(monkeypatch, blocks):
    """The diagonal/off-diagonal split must hold for any BLOCK_M, BLOCK_N (the GPU autotunes them)."""
    if ON_GPU:
        pytest.skip("tile shapes are chosen by the autotuner on a GPU")
    monkeypatch.setattr(configs, "INTERPRET_CONFIG", blocks)
    _check(1, 2, 70, 70, 16, True, torch.float32)
    _check(1, 1, 23, 50, 16, True, torch.float32)
    _check(1, 1, 50, 23, 16, True, torch.float32)


# --------------------------------------------------------------------------------------------
# Variants, forced one at a time
# --------------------------------------------------------------------------------------------

VARIANTS = [name for name in configs.VARIANTS if name != "today"]  # "today" is the grid above
# Per variant: every T, D, dtype and causal flag once, B and H both ways, and Tq != Tk both ways.
VARIANT_CASES = [
    (1, 3, 1, 1, 64, True, torch.float32),
    (2, 1, 17, 17, 128, False, torch.bfloat16),
    (1, 1, 64, 64, 16, True, torch.float16),
    (2, 3, 127, 127, 32, False, torch.float32),
    (1, 1, 257, 257, 64, True, torch.bfloat16),
    (1, 2, 37, 64, 128, True, torch.float16),
    (2, 1, 64, 37, 32, True, torch.bfloat16),
]


@pytest.fixture
def forced(request):
    """Run the test under the variant given as its ``variant`` parameter."""
    with configs.force_variant(request.getfixturevalue("variant")):
        yield


def _variant_id(case):
    B, H, T_q, T_k, D, causal, dtype = case
    return f"B{B}-H{H}-Tq{T_q}-Tk{T_k}-D{D}-{'causal' if causal else 'full'}-{str(dtype).removeprefix('torch.')}"


def test_variant_cases_cover_every_value():
    for position, values in ((2, SEQ_LENS), (4, HEAD_DIMS), (5, (True, False)), (6, DTYPES)):
        assert {case[position] for case in VARIANT_CASES} >= set(values)
    assert any(c[2] < c[3] for c in VARIANT_CASES) and any(c[2] > c[3] for c in VARIANT_CASES)


@pytest.mark.usefixtures("forced")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=_variant_id)
def test_variant_parity(variant, case):
    B, H, T_q, T_k, D, causal, dtype = case
    _check(B, H, T_q, T_k, D, causal, dtype)


@pytest.mark.slow
@pytest.mark.usefixtures("forced")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", FULL, ids=_case_id)
def test_variant_parity_full_grid(variant, case):
    B, H, T, D, causal, dtype = case
    _check(B, H, T, T, D, causal, dtype)


@pytest.mark.usefixtures("forced")
@pytest.mark.parametrize("variant", ["tma", "tma+tutorial_bwd"])
def test_variant_on_strided_inputs(variant):
    """The GPT layout, (B, T, H, D) storage: descriptors step by T's stride, not D's."""
    _check(2, 3, 45, 45, 32, True, torch.bfloat16, transpose_inputs=True)


@pytest.mark.usefixtures("forced")
@pytest.mark.parametrize("variant", ["tutorial_bwd", "tma+tutorial_bwd"])
def test_tutorial_tiles(monkeypatch, variant):
    """The tutorial's own backward tiles: 32 queries x 128 keys for dK/dV, 128 x 32 for dQ,
    over lengths that end mid-tile (the interior loop stops short of the last, ragged tile)."""
    if ON_GPU:
        pytest.skip("tile shapes are chosen by the autotuner on a GPU")
    monkeypatch.setattr(configs, "INTERPRET_CONFIG", {"fwd": (64, 32), "bwd_dkdv": (32, 128), "bwd_dq": (128, 32)})
    _check(1, 2, 300, 300, 64, True, torch.bfloat16)
    _check(1, 1, 200, 130, 32, False, torch.float16)


def test_an_unknown_variant_is_a_value_error():
    with pytest.raises(ValueError, match="tma"):
        with configs.force_variant("tmaa"):
            pass


def test_tma_only_for_layouts_descriptors_can_address():
    x = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16)
    assert configs.tma_eligible((x, x.transpose(1, 2).contiguous().transpose(1, 2)))
    assert not configs.tma_eligible((x[..., 1:33],))  # start 2 bytes past an aligned address
    assert not configs.tma_eligible((x.transpose(-1, -2),))  # D is not the unit-stride dimension
    odd_rows = torch.randn(2, 3, 40, 72, dtype=torch.bfloat16)[..., :64]  # rows 144 bytes apart: fine
    assert configs.tma_eligible((odd_rows,))
    assert not configs.tma_eligible((torch.randn(1, 1, 40, 68, dtype=torch.bfloat16)[..., :64],))  # 136 bytes
    if not ON_GPU:
        with configs.force_variant("tma"):
            _, meta = configs.attention_kernel("fwd", None, x, False, (x,))
            assert meta["TMA"]
            _, meta = configs.attention_kernel("fwd", None, x, False, (x[..., 1:33],))
            assert not meta["TMA"]  # the pointer kernel instead
        _check(1, 2, 40, 40, 32, True, torch.float32)


def test_philox_32_only_where_every_counter_fits():
    assert configs.philox_32bit(48, 1024, 1024)
    assert not configs.philox_32bit(2048, 1024, 1024)  # 2^31 counters
    assert not configs.philox_32bit(1, 65536, 65536)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _dropout_mask(B, H, T_q, T_k, causal, p, seed):
    """The kernel's keep-mask for this shape and seed, read back through a one-hot V.

    The mask depends only on the seed and the (batch*head, query, key) position, not on the
    data, so with V = identity (D >= Tk) the output's column j is P_ij * keep_ij / (1 - p).
    """
    D = 128
    assert T_k <= D
    q = torch.randn(B, H, T_q, D).to(DEVICE)
    k = torch.randn(B, H, T_k, D).to(DEVICE)
    v = torch.eye(T_k, D).expand(B, H, T_k, D).to(DEVICE)
    torch.manual_seed(seed)
    out = kernels.attention(q, k, v, causal=causal, dropout_p=p, backend="triton")
    probs = reference.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal, 0.0, D**-0.5)
    kept = out.cpu().double()[..., :T_k] != 0
    visible = probs[..., :T_k] > 0
    # where kept, the value is exactly P / (1 - p): the expectation over masks is P
    torch.testing.assert_close(
        out.cpu().double()[..., :T_k][kept], probs[..., :T_k][kept] / (1 - p), rtol=1e-4, atol=1e-6
    )
    return kept & visible, visible


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_right_fraction(p):
    kept, visible = _dropout_mask(2, 3, 64, 100, False, p, seed=123)
    n = visible.sum().item()
    fraction = kept.sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(fraction - (1 - p)) < 5 * sigma, f"kept {fraction:.4f} of {n}, expected {1 - p} +- {5 * sigma:.4f}"
    heads = kept.flatten(0, 1)
    assert not torch.equal(heads[0], heads[1]), "every (batch, head) must draw its own mask"


def test_dropout_same_seed_same_output():
    q, k, v, _ = _inputs(1, 2, 33, 33, 32, torch.float16)
    torch.manual_seed(7)
    a = kernels.attention(q, k, v, causal=True, dropout_p=0.2, backend="triton")
    torch.manual_seed(7)
    b = kernels.attention(q, k, v, causal=True, dropout_p=0.2, backend="triton")
    c = kernels.attention(q, k, v, causal=True, dropout_p=0.2, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "B, H, T_q, T_k, causal, dtype",
    [(2, 3, 37, 64, True, torch.float32), (1, 2, 64, 64, False, torch.float32), (1, 2, 50, 50, True, torch.bfloat16)],
)
def test_dropout_backward_uses_the_forward_mask(B, H, T_q, T_k, causal, dtype):
    """Recover the mask for a seed, then run random data with the same seed: output and grads
    must match a float64 reference that applies exactly that mask."""
    _check_dropout_mask_in_backward(B, H, T_q, T_k, causal, dtype)


@pytest.mark.parametrize(
    "variant, philox_32",
    [(variant, True) for variant in [None, *VARIANTS]] + [(None, False), ("tma+tutorial_bwd", False)],
    ids=lambda v: {True: "philox32", False: "philox64"}.get(v, v),
)
def test_dropout_in_every_variant(monkeypatch, variant, philox_32):
    """Each variant (32-bit counters), and the 64-bit counters through the pointer and the TMA
    kernels: the backward applies the forward's mask."""
    monkeypatch.setattr(configs, "PHILOX_32_ALLOWED", philox_32)
    with configs.force_variant(variant):
        _check_dropout_mask_in_backward(1, 2, 37, 50, True, torch.bfloat16)


def test_32_bit_counters_draw_the_same_mask(monkeypatch):
    """tl.rand runs the same Philox4x32 either way; 64-bit counters only add the high word (0
    here) and 64-bit index arithmetic, so the cheaper 32-bit counters keep every mask as it was."""
    masks = {}
    for philox_32 in (True, False):
        monkeypatch.setattr(configs, "PHILOX_32_ALLOWED", philox_32)
        masks[philox_32], visible = _dropout_mask(1, 2, 64, 100, False, 0.3, seed=5)
    assert torch.equal(masks[True], masks[False])
    fraction = masks[True].sum().item() / visible.sum().item()
    assert abs(fraction - 0.7) < 5 * math.sqrt(0.3 * 0.7 / visible.sum().item())


def _check_dropout_mask_in_backward(B, H, T_q, T_k, causal, dtype):
    p, seed = 0.25, 99
    kept, _ = _dropout_mask(B, H, T_q, T_k, causal, p, seed)
    D = 64
    q, k, v, do = _inputs(B, H, T_q, T_k, D, dtype)
    torch.manual_seed(seed)
    out = kernels.attention(q, k, v, causal=causal, dropout_p=p, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    expected = _reference(q, k, v, do, causal, D**-0.5, mask=kept, dropout_p=p)
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected, strict=True):
        _assert_close(name, actual, ref, dtype)


# --------------------------------------------------------------------------------------------
# Errors, dispatch and torch.compile
# --------------------------------------------------------------------------------------------


def test_unsupported_head_dim_is_a_value_error():
    q = torch.randn(1, 1, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="16, 32, 64, 128"):
        kernels.attention(q, q, q, backend="triton")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 8, 64), (1, 8, 64), (1, 8, 64)), "4-D"),
        (((1, 1, 8, 64), (1, 1, 8, 32), (1, 1, 8, 32)), "head_dim"),
        (((1, 1, 8, 64), (1, 1, 8, 64), (1, 1, 9, 64)), "same shape"),
    ],
)
def test_bad_shapes_are_value_errors(shapes, match):
    q, k, v = (torch.randn(*s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, v, backend="triton")


def test_mismatched_dtypes_are_value_errors():
    q = torch.randn(1, 1, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        kernels.attention(q, q.half(), q, backend="triton")


def test_cpu_without_interpreter_names_the_alternative(monkeypatch):
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    q = torch.randn(1, 1, 8, 64)
    reason = triton_attention.unsupported("attention", q, q, q, causal=True, dropout_p=0.0, scale=0.125)
    assert "CUDA" in reason and "sdpa" in reason
    with pytest.raises(kernels.BackendError, match="sdpa"):
        kernels.attention(q, q, q, backend="triton")


def test_torch_compile_fullgraph():
    """The custom ops let torch.compile trace kernels.attention without a graph break."""
    q, k, v, do = _inputs(1, 2, 40, 40, 32, torch.float32)

    def f(q, k, v):
        return kernels.attention(q, k, v, causal=True, backend="triton") * 2.0

    # eager first: it also warms kernels.dispatch's module cache (its first import is not traceable)
    eager = f(q, k, v)
    try:
        compiled = torch.compile(f, fullgraph=True)
        out = compiled(q, k, v)
    except Exception as err:  # noqa: BLE001
        if "C++ compiler" in str(err) or "CppCompileError" in type(err).__name__:
            pytest.skip(f"torch.compile's CPU backend needs a working C++ compiler here: {err}")
        raise
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out, (q, k, v), do)
    eager_grads = torch.autograd.grad(eager, (q, k, v), do)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_custom_ops_pass_opcheck():
    q, k, v, do = _inputs(1, 1, 9, 9, 16, torch.float32)
    torch.library.opcheck(
        torch.ops.gpt_kernels.flash_attention_fwd.default,
        (q, k, v, True, 0.0, 0.25, None),
        test_utils=("test_schema", "test_faketensor"),
    )
