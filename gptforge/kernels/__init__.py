"""Kernels behind one interface, with swappable backends.

    from gptforge.kernels import attention, layer_norm, LayerNorm, use_backend
    y = attention(q, k, v, causal=True)              # q, k, v: (B, H, T, D)
    y = layer_norm(x, weight, bias, eps=1e-5)        # over the last dim
    with use_backend(attention="sdpa", layer_norm="torch"): ...

This package knows nothing about GPT or training. Inputs are validated here, once, so every
backend receives well-formed tensors and every bad call gets the same clear ValueError.
"""

from __future__ import annotations

import math

import torch

from gptforge.kernels.dispatch import (
    REGISTRY,
    BackendError,
    available_backends,
    resolve,
    selected,
    use_backend,
)
from gptforge.kernels.documents import check_cu_seqlens, document_starts

__all__ = [
    "REGISTRY",
    "BackendError",
    "LayerNorm",
    "add_layer_norm",
    "attention",
    "available_backends",
    "document_starts",
    "layer_norm",
    "linear_cross_entropy",
    "selected",
    "use_backend",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same(what: str, names: tuple[str, ...], values: tuple) -> None:
    if len(set(values)) > 1:
        pairs = ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
        raise ValueError(f"{' and '.join(names)} must have the same {what}; got {pairs}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale) v``, over (B, H, T, D) inputs.

    ``q`` is (B, H, Tq, D); ``k`` and ``v`` are (B, H, Tk, D). With ``causal``, the mask is
    aligned bottom-right as in FlashAttention: query i sees keys j <= i + (Tk - Tq), so the
    last query sees every key (decoding against a cache). A query row that sees no key
    returns zeros. ``scale`` defaults to 1/sqrt(D). Returns q's dtype and shape.

    ``cu_seqlens`` packs documents into the rows, as ``flash_attn_varlen_func`` does: the
    offsets of the documents in the flattened (B * T) token axis (see kernels/documents.py).
    Attention is then causal inside each document and nothing crosses a document boundary.
    """
    if not _well_formed_attention(q, k, v):
        _explain_attention_args(q, k, v)  # raises, saying what was expected
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    args, kwargs = (q, k, v), dict(causal=bool(causal), dropout_p=float(dropout_p), scale=float(scale))
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, k, causal)
        kwargs["cu_seqlens"] = cu_seqlens
    return resolve("attention", "attention", backend, args, kwargs)(*args, **kwargs)


def _well_formed_attention(q: object, k: object, v: object) -> bool:
    """The common case, checked quickly (this runs on every call, once per layer per
    decoded token); ``_explain_attention_args`` says what is wrong otherwise."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    qs, ks = q.shape, k.shape
    return (
        len(qs) == 4 and len(ks) == 4 and ks == v.shape
        and qs[0] == ks[0] and qs[1] == ks[1] and qs[3] == ks[3] and 0 not in qs and 0 not in ks
        and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
    )


def _explain_attention_args(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    _check_same("dtype", ("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    _check_same("device", ("q", "k", "v"), (q.device, k.device, v.device))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(
            "q (B, H, Tq, D) and k (B, H, Tk, D) must agree on batch, heads and head_dim; "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"every dimension must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    raise AssertionError("_well_formed_attention refused arguments that every check accepts")


def _check_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
    if (  # the common case, checked quickly; the checks below say what is wrong otherwise
        isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] >= 1
        and _is_norm_param(weight, x.shape[-1], x.device) and _is_norm_param(bias, x.shape[-1], x.device)
        and isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0
    ):
        return
    _check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last dimension of size >= 1, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_float_tensor(name, p)
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dim, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; they must share a device")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")


def _is_norm_param(p: object, n: int, device: torch.device) -> bool:
    return p is None or (
        isinstance(p, torch.Tensor) and p.dtype in FLOAT_DTYPES and p.dim() == 1
        and p.shape[0] == n and p.device == device
    )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``; statistics in fp32; returns x's dtype."""
    _check_layer_norm(x, weight, bias, eps)
    args, kwargs = (x, weight, bias), dict(eps=float(eps))
    return resolve("layer_norm", "layer_norm", backend, args, kwargs)(*args, **kwargs)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = layer_norm(h)``; returns ``(y, h)``, fused where the backend can.

    x and residual may differ in dtype (under autocast the residual stream stays fp32 while a
    block's output is bf16): h and y then take the promoted dtype, as ``x + residual`` would.
    """
    _check_layer_norm(x, weight, bias, eps)
    if not (  # the common case, checked quickly
        isinstance(residual, torch.Tensor) and residual.dtype in FLOAT_DTYPES
        and residual.shape == x.shape and residual.device == x.device
    ):
        _check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_same("device", ("x", "residual"), (x.device, residual.device))
    args, kwargs = (x, residual, weight, bias), dict(eps=float(eps))
    return resolve("layer_norm", "add_layer_norm", backend, args, kwargs)(*args, **kwargs)


class LayerNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.LayerNorm(n)`` (same ``weight``/``bias`` state_dict keys),
    with an optional bias and a fused residual add: ``y, h = ln(x, residual=r)``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, backend: str | None = None):
        super().__init__()
        if not (isinstance(normalized_shape, int) and normalized_shape >= 1):
            raise ValueError(f"normalized_shape must be a positive int, got {normalized_shape!r}")
        if backend is not None:
            selected("layer_norm", backend)  # validate the name now, not at the first forward
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape))
        self.bias = torch.nn.Parameter(torch.zeros(normalized_shape)) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps, self.backend)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy (the language model's loss, without materialising the logits)
# --------------------------------------------------------------------------------------------

LOSS_REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)``, computed where the backend can without
    ever holding all the logits.

    ``hidden`` is (N, C) or (B, T, C), ``weight`` (V, C) (an output layer's, possibly tied to an
    embedding), ``targets`` (N,) or (B, T) integer class ids in [0, V), or ``ignore_index``.
    ``reduction="mean"`` averages over the rows whose target is not ``ignore_index``; when every
    row is ignored the loss is 0 and every gradient is zero (``F.cross_entropy`` would return NaN,
    which would poison a whole step for one fully masked micro-batch). ``"sum"`` adds them up.
    Returns an fp32 scalar whatever the input dtype; logits are formed and reduced in fp32, and
    gradients come back in each input's own dtype. Under autocast, hidden and weight are cast
    to the autocast dtype first, as ``nn.Linear`` would. Targets are not range-checked (that
    would cost a device sync): an out-of-range id other than ``ignore_index`` is undefined.
    """
    if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type) and hidden.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES:
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
    kwargs = dict(ignore_index=int(ignore_index), reduction=reduction)
    return resolve("linear_cross_entropy", "linear_cross_entropy", backend, args, kwargs)(*args, **kwargs)


def _check_linear_cross_entropy(
    hidden: object, weight: object, targets: object, ignore_index: object, reduction: object
) -> None:
    if (  # the common case, checked quickly; the checks below say what is wrong otherwise
        isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(targets, torch.Tensor)
        and hidden.dim() in (2, 3) and weight.dim() == 2 and targets.shape == hidden.shape[:-1]
        and hidden.shape[-1] == weight.shape[1] and min(hidden.shape) >= 1 and weight.shape[0] >= 1
        and hidden.dtype in FLOAT_DTYPES and hidden.dtype == weight.dtype
        and not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
        and hidden.device == weight.device == targets.device
        and isinstance(ignore_index, int) and reduction in LOSS_REDUCTIONS
    ):
        return
    _check_float_tensor("hidden", hidden)
    _check_float_tensor("weight", weight)
    if hidden.dim() not in (2, 3) or min(hidden.shape) < 1:
        raise ValueError(f"hidden must be (N, C) or (B, T, C) with every size >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be (V, C) with C = hidden's last dim {hidden.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() or (
        targets.dtype == torch.bool
    ):
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of class ids, got {what}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's shape without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    _check_same("dtype", ("hidden", "weight"), (hidden.dtype, weight.dtype))
    _check_same("device", ("hidden", "weight", "targets"), (hidden.device, weight.device, targets.device))
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    raise AssertionError("the quick check refused arguments that every check accepts")
