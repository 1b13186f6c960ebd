"""Fused LayerNorm in Triton, forward pass; the design is described in layer_norm.py.

A row of N elements is held whole in registers (BLOCK_N = next power of two >= N, up to
MAX_BLOCK_N) and BLOCK_M short rows go to one program; longer rows (up to MAX_N) go one row per
program in chunks, re-read from cache. Statistics are fp32 whatever the input dtype; every tile
is converted to fp32 right after it is loaded (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptforge.kernels.triton.common import as_rows, contiguous_or_none, device_guard, new_output
from gptforge.kernels.triton.configs import LONG_ROW_CHUNK, LONG_ROW_NUM_WARPS, MAX_BLOCK_N, layer_norm_config


@triton.jit
def _centre(h, mean, mask, n_cols):
    """Returns (centred, mean_lo): h - mean per row (zero outside the mask) with the mean's own
    rounding error mean_lo removed.

    An fp32 mean of 1e3 is off by up to half an ulp (3e-5), a 1e-5 error relative to a unit
    spread. The centred values are small, so their mean is that error, found almost exactly.
    The mean is then the unevaluated sum mean + mean_lo of two fp32 numbers, and the backward
    centres with both, so it sees exactly the forward's xhat.
    """
    centred = tl.where(mask, h - mean[:, None], 0.0)
    mean_lo = tl.sum(centred, axis=1) / n_cols
    return tl.where(mask, centred - mean_lo[:, None], 0.0), mean_lo


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows: row stride stride_x, unit column stride
    RES,  # (M, N) residual rows, row stride stride_res (read only when HAS_RESIDUAL)
    H,  # (M, N) contiguous output h = x + residual (written only when HAS_RESIDUAL)
    Y,  # (M, N) contiguous output
    W,  # (N,) weight (read only when HAS_WEIGHT)
    B,  # (N,) bias (read only when HAS_BIAS)
    MEAN,  # (2, M) fp32: the mean of each row as high part (row 0) + low part (row 1)
    RSTD,  # (M,) fp32
    stride_x,
    stride_res,
    n_rows,
    n_cols,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # 64-bit arithmetic once, for the tile's first row (M * N may exceed 2**31 elements); the
    # offsets inside the tile fit 32 bits, which keeps per-element address registers small.
    first_row = tl.program_id(0) * BLOCK_M
    X += first_row.to(tl.int64) * stride_x
    RES += first_row.to(tl.int64) * stride_res
    H += first_row.to(tl.int64) * n_cols
    Y += first_row.to(tl.int64) * n_cols
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = first_row + rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    out_offsets = rows[:, None] * n_cols + cols[None, :]

    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Round h to its storage dtype before normalising it: y is then exactly layer_norm of
        # the h we return, and the backward (which re-reads the stored h) sees the same values.
        h_stored = (h + res).to(H.dtype.element_ty)
        tl.store(H + out_offsets, h_stored, mask=mask)
        h = h_stored.to(tl.float32)

    mean = tl.sum(h, axis=1) / n_cols
    centred, mean_lo = _centre(h, mean, mask, n_cols)
    var = tl.sum(centred * centred, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    tl.store(Y + out_offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + first_row + rows, mean, mask=row_ok)
    tl.store(MEAN + n_rows + first_row + rows, mean_lo, mask=row_ok)
    tl.store(RSTD + first_row + rows, rstd, mask=row_ok)


@triton.jit
def _load_h(X, RES, offsets, mask, HAS_RESIDUAL: tl.constexpr, H_DTYPE: tl.constexpr):
    """x, or x + residual rounded to h's storage dtype, as fp32."""
    h = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = (h + tl.load(RES + offsets, mask=mask, other=0.0).to(tl.float32)).to(H_DTYPE).to(tl.float32)
    return h


@triton.jit
def _layer_norm_fwd_long_rows_kernel(
    X,  # this and the other arguments: as for _layer_norm_fwd_kernel
    RES,
    H,
    Y,
    W,
    B,
    MEAN,
    RSTD,
    stride_x,
    stride_res,
    n_rows,
    n_cols,
    eps,
    CHUNK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One row per program, CHUNK columns at a time, for rows too long for registers: three
    passes (mean; centred sums; normalise). Passes two and three re-read the row from cache."""
    row = tl.program_id(0)
    X += row.to(tl.int64) * stride_x
    RES += row.to(tl.int64) * stride_res
    H += row.to(tl.int64) * n_cols
    Y += row.to(tl.int64) * n_cols
    cols = tl.arange(0, CHUNK)

    total = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        mask = start + cols < n_cols
        h = _load_h(X + start, RES + start, cols, mask, HAS_RESIDUAL, H.dtype.element_ty)
        if HAS_RESIDUAL:
            tl.store(H + start + cols, h.to(H.dtype.element_ty), mask=mask)
        total += h
    mean = tl.sum(total, axis=0) / n_cols

    # centred sums; their mean is the mean's rounding error (see _centre)
    centred_sum = tl.zeros([CHUNK], dtype=tl.float32)
    centred_sq_sum = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        mask = start + cols < n_cols
        h = _load_h(X + start, RES + start, cols, mask, HAS_RESIDUAL, H.dtype.element_ty)
        centred = tl.where(mask, h - mean, 0.0)
        centred_sum += centred
        centred_sq_sum += centred * centred
    mean_lo = tl.sum(centred_sum, axis=0) / n_cols
    var = tl.sum(centred_sq_sum, axis=0) / n_cols - mean_lo * mean_lo
    rstd = 1.0 / tl.sqrt(var + eps)

    for start in range(0, n_cols, CHUNK):
        mask = start + cols < n_cols
        h = _load_h(X + start, RES + start, cols, mask, HAS_RESIDUAL, H.dtype.element_ty)
        y = (h - mean - mean_lo) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(MEAN + n_rows + row, mean_lo)
    tl.store(RSTD + row, rstd)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns (y, h or None, mean (2, M), rstd (M,)), y and h shaped like x.

    With a residual, h and y take the promoted dtype of x and residual, as ``x + residual`` does.
    """
    n_cols = x.shape[-1]
    x_rows = as_rows(x)
    weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)
    n_rows = x_rows.shape[0]
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = new_output(x.shape, out_dtype, x.device)
    h = new_output(x.shape, out_dtype, x.device) if residual is not None else None
    mean = new_output((2, n_rows), torch.float32, x.device)
    rstd = new_output((n_rows,), torch.float32, x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    res_rows = as_rows(residual) if residual is not None else x_rows
    unused = x_rows  # stands in for absent optional tensors; never read or written
    tensors = (
        x_rows,
        res_rows,
        h if h is not None else unused,
        y,
        weight if weight is not None else unused,
        bias if bias is not None else unused,
        mean,
        rstd,
    )
    scalars = (x_rows.stride(0), res_rows.stride(0), n_rows, n_cols, eps)
    flags = dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    block_m, block_n, num_warps = layer_norm_config(n_cols)
    with device_guard(x):
        if block_n <= MAX_BLOCK_N:
            _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                *tensors, *scalars, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=1
            )
        else:
            _layer_norm_fwd_long_rows_kernel[(n_rows,)](
                *tensors, *scalars, CHUNK=LONG_ROW_CHUNK, **flags, num_warps=LONG_ROW_NUM_WARPS, num_stages=1
            )
    return y, h, mean, rstd
