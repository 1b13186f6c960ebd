"""Fused LayerNorm in Triton: forward, backward, and a fused residual add.

    y = (h - mean(h)) * rstd * weight + bias,   rstd = 1 / sqrt(var(h) + eps)

where ``h = x`` for ``layer_norm`` and ``h = x + residual`` for ``add_layer_norm``.

Design, in the order a reader meets it: layer_norm_forward.py (1), layer_norm_backward.py (2),
configs.py (3), then this file (4, 5).

1. Forward kernels. A row of N elements is held whole in registers (BLOCK_N = next power of
   two >= N, up to MAX_BLOCK_N), so the input is read once and every statistic is a reduction
   over registers: the mean first, then the sum of squared deviations from it (no
   cancellation when the mean dwarfs the spread). For short rows one program normalises
   BLOCK_M rows at once, so every program moves a few KiB with wide loads. Statistics are
   fp32 whatever the input dtype; the mean (kept as two fp32 numbers, see ``_centre``) and
   rstd are saved for the backward. Longer rows (up to MAX_N) go one row per program in
   chunks, re-reading the row from cache rather than holding it.
2. Backward kernels. With xhat = (h - mean) * rstd and g = dy * weight,
       dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
   is per row. dweight = sum over rows of dy * xhat and dbias = sum of dy are column sums: a
   fixed number of programs (a few per SM) each walks its share of the rows, keeps running
   column sums in registers and writes one partial row; torch sums those few partial rows.
   No atomics, no serial pass over all rows, deterministic. Rows longer than
   ``PARAM_GRADS_IN_ROW_KERNEL_MAX`` leave no registers for the running sums: there the row
   kernel computes dh only and a column-tiled kernel forms the partial sums.
3. Launch configuration: tile shape and warps follow from N alone (a heuristic rather than
   autotuning, which the interpreter cannot run; a fixed rule also lets gptforge/kernels/aot_specs.py
   list every configuration the GPU may launch).
4. Custom ops (``torch.library.custom_op``) with fake implementations and autograd formulas,
   so ``torch.compile(fullgraph=True)`` traces through them without graph breaks.
5. The backend functions ``layer_norm``, ``add_layer_norm`` and ``unsupported`` that
   ``gptforge/kernels/dispatch.py`` calls; their inputs were validated by ``kernels/__init__.py``.

Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) bf16 arithmetic is wrong, so
every tile is converted to fp32 right after it is loaded, before any arithmetic.
"""

from __future__ import annotations

import torch

from gptforge.kernels.triton.common import off_gpu_refusal
from gptforge.kernels.triton.configs import MAX_N
from gptforge.kernels.triton.layer_norm_backward import backward
from gptforge.kernels.triton.layer_norm_forward import forward

# --------------------------------------------------------------------------------------------
# 4. Custom ops: the launchers as ops, fake (shape-only) implementations, autograd
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _fake_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((2, _rows(x)), dtype=torch.float32), x.new_empty((_rows(x),), dtype=torch.float32)


@torch.library.custom_op("gpt_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean (2, M), rstd (M,))."""
    y, _, mean, rstd = forward(x, None, weight, bias, eps)
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape), *_fake_stats(x)


@torch.library.custom_op("gpt_kernels::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, mean (2, M), rstd (M,)) with h = x + residual."""
    return forward(x, residual, weight, bias, eps)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), *_fake_stats(x)


# Returns (dh, param_grads): dh = dh_in + the gradient through the LayerNorm, and an fp32 (k, N)
# tensor holding dweight (if needed), then dbias (if needed). One tensor rather than two
# because a custom op's outputs may not alias, and one reduction fills both rows. The launcher
# is the op's implementation as it stands (its type hints give the schema).
layer_norm_bwd = torch.library.custom_op("gpt_kernels::layer_norm_bwd", backward, mutates_args=())


@layer_norm_bwd.register_fake
def _(dy, h, weight, mean, rstd, dh_in, need_dweight, need_dbias):
    return h.new_empty(h.shape), h.new_empty((int(need_dweight) + int(need_dbias), h.shape[-1]), dtype=torch.float32)


def _param_grads(ctx, param_grads: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split layer_norm_bwd's fp32 (k, N) rows into (dweight, dbias), each in its parameter's dtype."""
    dweight = param_grads[0].to(ctx.weight_dtype) if ctx.need_dweight else None
    dbias = param_grads[-1].to(ctx.bias_dtype) if ctx.need_dbias else None
    return dweight, dbias


def _save_params(ctx, weight: torch.Tensor | None, bias: torch.Tensor | None, weight_index: int) -> None:
    ctx.need_dweight = weight is not None and ctx.needs_input_grad[weight_index]
    ctx.need_dbias = bias is not None and ctx.needs_input_grad[weight_index + 1]
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _setup_layer_norm(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    _save_params(ctx, weight, bias, weight_index=1)


def _backward_layer_norm(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, param_grads = layer_norm_bwd(dy, x, weight, mean, rstd, None, ctx.need_dweight, ctx.need_dbias)
    return dx, *_param_grads(ctx, param_grads), None


layer_norm_fwd.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)


def _setup_add_layer_norm(ctx, inputs, output) -> None:
    x, residual, weight, bias, _ = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    _save_params(ctx, weight, bias, weight_index=2)


def _backward_add_layer_norm(ctx, dy, dh_in, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # autograd materialises unused outputs' gradients as zeros; be safe anyway
        dy = torch.zeros_like(h)
    dh, param_grads = layer_norm_bwd(dy, h, weight, mean, rstd, dh_in, ctx.need_dweight, ctx.need_dbias)
    # h = x + residual: both inputs receive dh (the same tensor, as torch's add backward does),
    # each in its own dtype.
    dx, dresidual = dh.to(ctx.x_dtype), dh.to(ctx.residual_dtype)
    return dx, dresidual, *_param_grads(ctx, param_grads), None


add_layer_norm_fwd.register_autograd(_backward_add_layer_norm, setup_context=_setup_add_layer_norm)


# --------------------------------------------------------------------------------------------
# 5. The backend interface (see gptforge/kernels/dispatch.py)
# --------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of x; fp32 statistics; returns x's dtype and shape."""
    return layer_norm_fwd(x, weight, bias, eps)[0]


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = layer_norm(h)`` in one pass; returns (y, h) in their promoted dtype."""
    y, h, _, _ = add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, h


def unsupported(fn: str, *tensors: torch.Tensor | None, **kwargs) -> str | None:
    """None when this backend can run the call, else one sentence saying why not."""
    x = tensors[0]
    refusal = off_gpu_refusal(x, "torch")
    if refusal is not None:
        return refusal
    if x.shape[-1] > MAX_N:
        return (
            f"rows of {x.shape[-1]} elements exceed the {MAX_N} this backend accepts (it re-reads long "
            "rows from an SM's cache, which holds no more); use backend 'torch' for longer rows"
        )
    return None
