"""The kernel interface: backend selection rules, input validation, and parity of the
PyTorch backends (torch, sdpa) against a float64 reference."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gptforge import kernels
from gptforge.kernels import BackendError, attention, dispatch, layer_norm, use_backend
from gptforge.kernels.dispatch import resolve, selected

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def reference_attention(q, k, v, causal):
    """float64 ground truth, written independently of kernels.reference."""
    q, k, v = (t.double() for t in (q, k, v))
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return p @ v


def close(actual, expected, dtype, what):
    assert not actual.isnan().any(), f"{what}: NaN"
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("t_q", "t_k"), [(1, 1), (17, 17), (64, 64), (1, 100), (37, 64), (9, 4)])
def test_attention_matches_float64_reference(backend, dtype, causal, t_q, t_k):
    q = torch.randn(2, 3, t_q, 32)
    k, v = torch.randn(2, 3, t_k, 32), torch.randn(2, 3, t_k, 32)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, causal=causal, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, causal)
    ref.backward(grad_out.double())
    close(out, ref, dtype, "output")
    for name, t, r in zip("qkv", (q, k, v), ref_inputs, strict=True):
        close(t.grad, r.grad, dtype, f"d{name}")


def test_attention_accepts_strided_inputs():
    qkv = torch.randn(2, 5, 3 * 4 * 16)  # as the model makes them: one projection, split and transposed
    q, k, v = (t.view(2, 5, 4, 16).transpose(1, 2) for t in qkv.split(64, dim=-1))
    assert not q.is_contiguous()
    expected = reference_attention(q, k, v, causal=True)
    for backend in ("torch", "sdpa"):
        close(attention(q, k, v, backend=backend), expected, torch.float32, backend)


def test_attention_dropout_keeps_expectation():
    torch.manual_seed(0)
    q = k = torch.zeros(1, 1, 8, 16)
    v = torch.ones(1, 1, 8, 16)
    for backend in ("torch", "sdpa"):
        out = torch.stack([attention(q, k, v, causal=False, dropout_p=0.3, backend=backend) for _ in range(400)])
        assert abs(out.mean().item() - 1.0) < 0.02, backend  # dropped weights are rescaled by 1/(1-p)
        assert (out != 1.0).any(), backend  # and dropout did happen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64_reference(dtype, affine):
    x = (torch.randn(3, 7, 33) * 2 + 5).to(dtype).requires_grad_()
    w = torch.randn(33, requires_grad=True) if affine else None
    b = torch.randn(33, requires_grad=True) if affine else None
    y = layer_norm(x, w, b, backend="torch")
    assert y.dtype == dtype
    xd = x.detach().double()
    mean, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    expected = (xd - mean) / torch.sqrt(var + 1e-5)
    if affine:
        expected = expected * w.detach().double() + b.detach().double()
    close(y, expected, dtype, "layer_norm")


def test_add_layer_norm_returns_sum_and_normalised_sum():
    x, r = torch.randn(4, 10), torch.randn(4, 10)
    ln = kernels.LayerNorm(10)
    y, h = ln(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (10,)))


def test_layer_norm_module_is_a_drop_in_for_torch():
    ours, theirs = kernels.LayerNorm(12), torch.nn.LayerNorm(12)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    no_bias = kernels.LayerNorm(12, bias=False).state_dict().keys()
    assert no_bias == torch.nn.LayerNorm(12, bias=False).state_dict().keys()


@pytest.fixture
def set_env(monkeypatch):
    """Set GPT_KERNELS as if before the process started (kernels reads it once)."""
    def set_to(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("GPT_KERNELS", raising=False)
        else:
            monkeypatch.setenv("GPT_KERNELS", value)
        dispatch.reload_env()
    yield set_to
    monkeypatch.delenv("GPT_KERNELS", raising=False)
    dispatch.reload_env()


def test_selection_order(set_env):
    set_env("attention=torch")
    assert selected("attention") == "torch"
    with use_backend(attention="sdpa"):
        assert selected("attention") == "sdpa"  # the context manager beats the env var
        assert selected("attention", "torch") == "torch"  # and the call's backend= beats both
        with use_backend(layer_norm="torch"):
            assert selected("attention") == "sdpa"  # nested contexts keep outer choices
    assert selected("attention") == "torch"
    set_env(None)
    assert selected("attention") == "auto"


def test_memoised_resolution_follows_use_backend():
    q = torch.randn(1, 2, 3, 8)
    args, kwargs = (q, q, q), dict(causal=True, dropout_p=0.0, scale=0.35)

    def module() -> str:
        return resolve("attention", "attention", None, args, kwargs).__module__

    # auto on the CPU, then from the memo
    assert module() == "gptforge.kernels.sdpa" and module() == "gptforge.kernels.sdpa"
    with use_backend(attention="torch"):
        assert module() == "gptforge.kernels.reference"
        with use_backend(attention="sdpa"):
            assert module() == "gptforge.kernels.sdpa"
            assert resolve("attention", "attention", "torch", args, kwargs).__module__ == "gptforge.kernels.reference"
        assert module() == "gptforge.kernels.reference"
    assert module() == "gptforge.kernels.sdpa"


def test_a_selection_changed_mid_resolution_is_not_memoised(monkeypatch):
    """Another thread entering use_backend while this one resolves: its answer is not kept."""
    q = torch.randn(1, 2, 3, 8)
    args, kwargs = (q, q, q), dict(causal=True, dropout_p=0.0, scale=0.35)
    walk = dispatch._resolve

    def interrupted(*a):
        dispatch._selection_changed()
        return walk(*a)

    dispatch._selection_changed()
    monkeypatch.setattr(dispatch, "_resolve", interrupted)
    resolve("attention", "attention", None, args, kwargs)
    assert not dispatch._resolved
    monkeypatch.setattr(dispatch, "_resolve", walk)
    resolve("attention", "attention", None, args, kwargs)
    assert dispatch._resolved


def test_the_env_var_is_read_once(set_env, monkeypatch):
    set_env("attention=torch")
    assert selected("attention") == "torch"
    monkeypatch.setenv("GPT_KERNELS", "attention=sdpa")  # too late: already read
    assert selected("attention") == "torch"
    dispatch.reload_env()
    assert selected("attention") == "sdpa"


def test_auto_picks_a_backend_that_runs_here():
    q = torch.randn(1, 1, 4, 16)
    fn = resolve("attention", "attention", None, (q, q, q), dict(causal=True, dropout_p=0.0, scale=0.25))
    assert fn.__module__ == "gptforge.kernels.sdpa"  # the fastest correct PyTorch op on the CPU
    assert "torch" in kernels.available_backends("attention") and "sdpa" in kernels.available_backends("attention")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda q: attention(q, q, q, backend="nope"), "unknown attention backend 'nope'"),
        (lambda q: attention(q[0], q[0], q[0]), "must be 4-D"),
        (lambda q: attention(q, q.double(), q), "float32, float16 or bfloat16"),
        (lambda q: attention(q, q.half(), q.half()), "same dtype"),
        (lambda q: attention(q, q, q[..., :8]), "same shape"),
        (lambda q: attention(q, q[:, :1], q[:, :1]), "agree on batch, heads and head_dim"),
        (lambda q: attention(q, q, q, dropout_p=1.0), "dropout_p must be in"),
        (lambda q: attention(q, q, q, scale=-1.0), "scale must be a positive"),
        (lambda q: attention(q, q, q, backend="flash_attn"), "flash_attn"),
        (lambda q: layer_norm(q, torch.ones(3)), r"weight must have shape \(16,\)"),
        (lambda q: layer_norm(q, eps=0.0), "eps must be a positive"),
        (lambda q: kernels.add_layer_norm(q, q[..., :8]), "residual must have x's shape"),
        (lambda q: layer_norm(q, backend="sdpa"), "unknown layer_norm backend 'sdpa'"),
    ],
)
def test_bad_calls_raise_clear_value_errors(call, match):
    q = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match=match):
        call(q)


def test_bad_env_var_is_a_clear_error(set_env):
    set_env("attention")
    with pytest.raises(BackendError, match="op=backend pairs"):
        selected("attention")
    set_env("attention=cuda_magic")
    with pytest.raises(BackendError, match="unknown attention backend"):
        selected("attention")


def test_compiled_calls_do_not_recompile_when_the_selection_stays_put():
    """Dispatch must not make torch.compile recompile: a second call on the same shapes reuses
    the graph, also when every call enters use_backend as a training loop might per step."""
    from torch._dynamo.testing import CompileCounter

    from gptforge.gpt.config import GPTConfig
    from gptforge.gpt.model import build_model

    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=11))
    idx = torch.randint(0, 11, (2, 8))
    for per_step in (contextlib.nullcontext, lambda: use_backend(attention="sdpa")):
        torch._dynamo.reset()
        counter = CompileCounter()  # compiles each frame once, then runs it eagerly
        compiled = torch.compile(model, backend=counter)
        for _ in range(2):
            with per_step():
                compiled(idx)
        assert counter.frame_count == 1, f"{counter.frame_count} compiles of the model's forward, expected 1"
    torch._dynamo.reset()
