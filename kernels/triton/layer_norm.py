"""Fused LayerNorm in Triton: forward, backward, and a fused residual add.

    y = (h - mean(h)) * rstd * weight + bias,   rstd = 1 / sqrt(var(h) + eps)

where ``h = x`` for ``layer_norm`` and ``h = x + residual`` for ``add_layer_norm``.

Design, in the order the code below follows:

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
   autotuning, which the interpreter cannot run; a fixed rule also lets ``aot_specs`` list
   every configuration the GPU may launch).
4. Custom ops (``torch.library.custom_op``) with fake implementations and autograd formulas,
   so ``torch.compile(fullgraph=True)`` traces through them without graph breaks.
5. The backend functions ``layer_norm``, ``add_layer_norm`` and ``unsupported`` that
   ``kernels/dispatch.py`` calls; their inputs were validated by ``kernels/__init__.py``.

Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) bf16 arithmetic is wrong, so
every tile is converted to fp32 right after it is loaded, before any arithmetic.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

# Longest row a program holds whole in registers (BLOCK_N); longer rows go in chunks.
MAX_BLOCK_N = 8192
# Longest row we accept: a chunked row is re-read from cache, and 64K fp32 values fill an SM's L1.
MAX_N = 65536
# Elements one program handles at a time (BLOCK_M rows x BLOCK_N columns) when rows are short.
TILE_ELEMENTS = 2048
# Elements per thread and tensor the warp count aims at: one 16-byte load for bf16/fp16.
ELEMENTS_PER_THREAD = 8
# Longest BLOCK_N whose backward keeps dweight/dbias running sums in registers.
PARAM_GRADS_IN_ROW_KERNEL_MAX = 4096
# Chunk (columns) and warps of the kernels for rows longer than MAX_BLOCK_N.
LONG_ROW_CHUNK, LONG_ROW_NUM_WARPS = 4096, 16
# Tile of the column-sum kernel used for longer rows.
COLUMN_SUMS_BLOCK_M, COLUMN_SUMS_BLOCK_N, COLUMN_SUMS_NUM_WARPS = 8, 256, 8
# Resident warps per SM the backward's program count aims at.
WARPS_PER_SM = 32
# What the interpreter takes for the SM count (it only sets how many partial rows there are).
INTERPRETER_SM_COUNT = 4

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Every kernel launches with num_stages=1: the loops gain from several resident programs per
# SM rather than from software pipelining (which would stage another tile in shared memory).


# --------------------------------------------------------------------------------------------
# 1. Forward kernels
# --------------------------------------------------------------------------------------------


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
# 2. Backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _xhat(H, MEAN, RSTD, offsets, first_row, rows, row_ok, mask, n_rows):
    """Load a tile of h and return (xhat, rstd), centred exactly as the forward centred it."""
    h = tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + first_row + rows, mask=row_ok, other=0.0)
    mean_lo = tl.load(MEAN + n_rows + first_row + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + first_row + rows, mask=row_ok, other=0.0)
    centred = tl.where(mask, h - mean[:, None] - mean_lo[:, None], 0.0)
    return centred * rstd[:, None], rstd


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of y, row stride stride_dy
    H,  # (M, N) the normalised input as the forward saw it, row stride stride_h
    W,  # (N,) weight (read only when HAS_WEIGHT)
    MEAN,  # (2, M) fp32, as the forward wrote it
    RSTD,  # (M,) fp32
    DH_IN,  # (M, N) incoming gradient of add_layer_norm's output h (read only when HAS_DH_IN)
    DH,  # (M, N) contiguous output: gradient of h (of x, and of residual when fused)
    DW_PARTIAL,  # (num_programs, N) fp32: this program's column sums of dy * xhat
    DB_PARTIAL,  # (num_programs, N) fp32: this program's column sums of dy
    stride_dy,
    stride_h,
    stride_dh_in,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
    SUM_DW: tl.constexpr,  # accumulate dweight partial sums here
    SUM_DB: tl.constexpr,  # accumulate dbias partial sums here
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    # Running column sums over every tile this program visits, reduced over BLOCK_M only once
    # at the end, so the loop itself needs no communication between threads for them.
    dw_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    # Tiles pid, pid + num_programs, ...; counted from 0 because under the interpreter a loop
    # variable is a Python int, while pid-based values are tensors in both modes.
    for i in range(0, tl.cdiv(tl.cdiv(n_rows, BLOCK_M) - pid, num_programs)):
        first_row = (pid + i * num_programs) * BLOCK_M
        first_row64 = first_row.to(tl.int64)
        row_ok = first_row + rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]

        h_offsets = rows[:, None] * stride_h + cols[None, :]
        xhat, rstd = _xhat(H + first_row64 * stride_h, MEAN, RSTD, h_offsets, first_row, rows, row_ok, mask, n_rows)
        dy_ptrs = DY + first_row64 * stride_dy + rows[:, None] * stride_dy + cols[None, :]
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = dy
        if HAS_WEIGHT:
            g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_g_xhat = tl.sum(g * xhat, axis=1) / n_cols
        dh = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
        if HAS_DH_IN:
            dh_in_ptrs = DH_IN + first_row64 * stride_dh_in + rows[:, None] * stride_dh_in + cols[None, :]
            dh += tl.load(dh_in_ptrs, mask=mask, other=0.0).to(tl.float32)
        dh_ptrs = DH + first_row64 * n_cols + rows[:, None] * n_cols + cols[None, :]
        tl.store(dh_ptrs, dh.to(DH.dtype.element_ty), mask=mask)

        if SUM_DW:
            dw_sum += dy * xhat
        if SUM_DB:
            db_sum += dy

    if SUM_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_sum, axis=0), mask=col_ok)
    if SUM_DB:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.sum(db_sum, axis=0), mask=col_ok)


@triton.jit
def _layer_norm_bwd_long_rows_kernel(
    DY,  # this and the other arguments: as for _layer_norm_bwd_kernel
    H,
    W,
    MEAN,
    RSTD,
    DH_IN,
    DH,
    stride_dy,
    stride_h,
    stride_dh_in,
    n_rows,
    n_cols,
    CHUNK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
):
    """dh for rows too long for registers: one row per program, CHUNK columns at a time, two
    passes (the row sums; then dh), the second re-reading from cache. dweight and dbias come
    from _layer_norm_column_sums_kernel."""
    row = tl.program_id(0)
    DY += row.to(tl.int64) * stride_dy
    H += row.to(tl.int64) * stride_h
    DH_IN += row.to(tl.int64) * stride_dh_in
    DH += row.to(tl.int64) * n_cols
    mean = tl.load(MEAN + row)
    mean_lo = tl.load(MEAN + n_rows + row)
    rstd = tl.load(RSTD + row)
    cols = tl.arange(0, CHUNK)

    g_sum = tl.zeros([CHUNK], dtype=tl.float32)
    g_xhat_sum = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        mask = start + cols < n_cols
        xhat = tl.where(mask, tl.load(H + start + cols, mask=mask, other=0.0).to(tl.float32) - mean - mean_lo, 0.0)
        g = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        g_sum += g
        g_xhat_sum += g * xhat * rstd
    mean_g = tl.sum(g_sum, axis=0) / n_cols
    mean_g_xhat = tl.sum(g_xhat_sum, axis=0) / n_cols

    for start in range(0, n_cols, CHUNK):
        mask = start + cols < n_cols
        xhat = (tl.load(H + start + cols, mask=mask, other=0.0).to(tl.float32) - mean - mean_lo) * rstd
        g = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        dh = (g - mean_g - xhat * mean_g_xhat) * rstd
        if HAS_DH_IN:
            dh += tl.load(DH_IN + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + start + cols, dh.to(DH.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_column_sums_kernel(
    DY,  # (M, N) gradient of y, row stride stride_dy
    H,  # (M, N) the normalised input, row stride stride_h
    MEAN,  # (2, M) fp32
    RSTD,  # (M,) fp32
    DW_PARTIAL,  # (num_row_groups, N) fp32: column sums of dy * xhat over this row group
    DB_PARTIAL,  # (num_row_groups, N) fp32: column sums of dy over this row group
    stride_dy,
    stride_h,
    n_rows,
    n_cols,
    rows_per_group,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUM_DW: tl.constexpr,
    SUM_DB: tl.constexpr,
):
    """For rows too long to keep running sums beside them: program (g, c) sums columns block c
    over row group g. Reads h and dy a second time, as PyTorch's own LayerNorm backward does."""
    group = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    dw_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    group_start = group * rows_per_group
    group_end = tl.minimum(group_start + rows_per_group, n_rows)
    # Loop over offsets inside the group: under the interpreter a loop variable is a Python int.
    for row_offset in range(0, rows_per_group, BLOCK_M):
        first_row = group_start + row_offset
        first_row64 = first_row.to(tl.int64)
        row_ok = first_row + rows < group_end
        mask = row_ok[:, None] & col_ok[None, :]
        dy_ptrs = DY + first_row64 * stride_dy + rows[:, None] * stride_dy + cols[None, :]
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        if SUM_DB:
            db_sum += dy
        if SUM_DW:
            h_offsets = rows[:, None] * stride_h + cols[None, :]
            xhat, _ = _xhat(H + first_row64 * stride_h, MEAN, RSTD, h_offsets, first_row, rows, row_ok, mask, n_rows)
            dw_sum += dy * xhat
    if SUM_DW:
        tl.store(DW_PARTIAL + group * n_cols + cols, tl.sum(dw_sum, axis=0), mask=col_ok)
    if SUM_DB:
        tl.store(DB_PARTIAL + group * n_cols + cols, tl.sum(db_sum, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# 3. Launch configuration and launchers
# --------------------------------------------------------------------------------------------


def _config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n_cols elements, the same for both passes.

    A tile holds max(BLOCK_N, TILE_ELEMENTS) elements, and the warps give each thread
    ELEMENTS_PER_THREAD of them. (Rows past MAX_BLOCK_N use the long-row kernels instead.)
    """
    block_n = triton.next_power_of_2(n_cols)
    tile = max(block_n, TILE_ELEMENTS)
    num_warps = min(32, max(1, tile // (32 * ELEMENTS_PER_THREAD)))
    return tile // block_n, block_n, num_warps


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


# Parity checks set this to fill every buffer the kernels allocate with NaN first, so an element
# a kernel forgot to write fails the comparison (the same switch as the attention kernels').
POISON_OUTPUTS = False


def _uninitialised(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output whose every element the kernel writes."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View t as (rows, N) with a unit column stride; copies only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _unit_stride(param: torch.Tensor | None) -> torch.Tensor | None:
    return param.contiguous() if param is not None else None


def _forward(
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
    x_rows = _as_rows(x)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    n_rows = x_rows.shape[0]
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = _uninitialised(x.shape, out_dtype, x.device)
    h = _uninitialised(x.shape, out_dtype, x.device) if residual is not None else None
    mean = _uninitialised((2, n_rows), torch.float32, x.device)
    rstd = _uninitialised((n_rows,), torch.float32, x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    res_rows = _as_rows(residual) if residual is not None else x_rows
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
    block_m, block_n, num_warps = _config(n_cols)
    if block_n <= MAX_BLOCK_N:
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            *tensors, *scalars, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=1
        )
    else:
        _layer_norm_fwd_long_rows_kernel[(n_rows,)](
            *tensors, *scalars, CHUNK=LONG_ROW_CHUNK, **flags, num_warps=LONG_ROW_NUM_WARPS, num_stages=1
        )
    return y, h, mean, rstd


def _backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_in: torch.Tensor | None,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dh, param_grads) where param_grads is fp32 (k, N): dweight
    (if needed), then dbias (if needed)."""
    n_cols = h.shape[-1]
    h_rows, dy_rows = _as_rows(h), _as_rows(dy)
    dh_in_rows = _as_rows(dh_in) if dh_in is not None else dy_rows
    weight = _unit_stride(weight)
    n_rows = h_rows.shape[0]
    dh = _uninitialised(h.shape, h.dtype, h.device)
    n_param_grads = int(need_dweight) + int(need_dbias)
    if n_rows == 0:
        if dh_in is not None:
            dh.copy_(dh_in)
        return dh, torch.zeros(n_param_grads, n_cols, dtype=torch.float32, device=h.device)

    block_m, block_n, num_warps = _config(n_cols)
    long_rows = block_n > MAX_BLOCK_N
    sums_in_row_kernel = block_n <= PARAM_GRADS_IN_ROW_KERNEL_MAX
    n_sm = _sm_count(h.device)
    # a few programs per SM, each walking its share of the rows (and writing one partial row)
    n_programs = n_partials = min(triton.cdiv(n_rows, block_m), n_sm * max(1, WARPS_PER_SM // num_warps))
    if not sums_in_row_kernel:
        # column-sum kernel grid: row groups x column blocks, about WARPS_PER_SM warps per SM
        col_blocks = triton.cdiv(n_cols, COLUMN_SUMS_BLOCK_N)
        groups_wanted = triton.cdiv(n_sm * WARPS_PER_SM // COLUMN_SUMS_NUM_WARPS, col_blocks)
        rows_per_group = triton.cdiv(triton.cdiv(n_rows, groups_wanted), COLUMN_SUMS_BLOCK_M) * COLUMN_SUMS_BLOCK_M
        n_partials = triton.cdiv(n_rows, rows_per_group)
    # One buffer for both partial sums, so that one reduction finishes both.
    partials = _uninitialised((n_param_grads, n_partials, n_cols), torch.float32, h.device)
    dw_partial = partials[0] if need_dweight else None
    db_partial = partials[-1] if need_dbias else None
    unused = mean  # stands in for absent optional tensors; never read or written
    w_arg = weight if weight is not None else unused
    strides = (dy_rows.stride(0), h_rows.stride(0), dh_in_rows.stride(0), n_rows, n_cols)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_DH_IN=dh_in is not None)

    if long_rows:
        _layer_norm_bwd_long_rows_kernel[(n_rows,)](
            dy_rows, h_rows, w_arg, mean, rstd, dh_in_rows, dh, *strides,
            CHUNK=LONG_ROW_CHUNK, **flags, num_warps=LONG_ROW_NUM_WARPS, num_stages=1,
        )  # fmt: skip
    else:
        _layer_norm_bwd_kernel[(n_programs,)](
            dy_rows, h_rows, w_arg, mean, rstd, dh_in_rows, dh,
            dw_partial if dw_partial is not None and sums_in_row_kernel else unused,
            db_partial if db_partial is not None and sums_in_row_kernel else unused,
            *strides,
            BLOCK_M=block_m, BLOCK_N=block_n, **flags,
            SUM_DW=sums_in_row_kernel and dw_partial is not None,
            SUM_DB=sums_in_row_kernel and db_partial is not None,
            num_warps=num_warps, num_stages=1,
        )  # fmt: skip
    if not sums_in_row_kernel and (dw_partial is not None or db_partial is not None):
        _layer_norm_column_sums_kernel[(n_partials, col_blocks)](
            dy_rows, h_rows, mean, rstd,
            dw_partial if dw_partial is not None else unused,
            db_partial if db_partial is not None else unused,
            dy_rows.stride(0), h_rows.stride(0), n_rows, n_cols, rows_per_group,
            BLOCK_M=COLUMN_SUMS_BLOCK_M, BLOCK_N=COLUMN_SUMS_BLOCK_N,
            SUM_DW=dw_partial is not None, SUM_DB=db_partial is not None,
            num_warps=COLUMN_SUMS_NUM_WARPS, num_stages=1,
        )  # fmt: skip
    # The second reduction: at most a few hundred partial rows per column, summed by torch.
    return dh, partials.sum(1)


# --------------------------------------------------------------------------------------------
# 4. Custom ops: real implementations, fake (shape-only) implementations, autograd
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
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape), *_fake_stats(x)


@torch.library.custom_op("gpt_kernels::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, mean (2, M), rstd (M,)) with h = x + residual."""
    return _forward(x, residual, weight, bias, eps)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), *_fake_stats(x)


@torch.library.custom_op("gpt_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_in: torch.Tensor | None,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dh, param_grads): dh = dh_in + the gradient through the LayerNorm, and an fp32
    (k, N) tensor holding dweight (if needed), then dbias (if needed). One tensor rather than
    two because a custom op's outputs may not alias, and one reduction fills both rows."""
    return _backward(dy, h, weight, mean, rstd, dh_in, need_dweight, need_dbias)


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
# 5. The backend interface (see kernels/dispatch.py)
# --------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of x; fp32 statistics; returns x's dtype and shape."""
    return layer_norm_fwd(x, weight, bias, eps)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = layer_norm(h)`` in one pass; returns (y, h) in their promoted dtype."""
    y, h, _, _ = add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, h


def unsupported(op: str, *tensors: torch.Tensor | None, **kwargs) -> str | None:
    """None when this backend can run the call, else one sentence saying why not."""
    x = tensors[0]
    if x.device.type != "cuda" and not INTERPRETING:
        return (
            f"triton needs CUDA tensors, got {x.device.type} tensors; on the CPU use backend 'torch' "
            "(or set TRITON_INTERPRET=1 before importing triton, for slow testing)"
        )
    if x.shape[-1] > MAX_N:
        return (
            f"rows of {x.shape[-1]} elements exceed the {MAX_N} this backend accepts (it re-reads long "
            "rows from an SM's cache, which holds no more); use backend 'torch' for longer rows"
        )
    return None


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (kernels/aot.py): every configuration the launchers above may use
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


_DEFAULT_AOT_BLOCK_N = (1, 128, 1024, 2048, 4096, 8192)
# (x or dy, residual, weight) dtypes: fp32 training, and bf16 autocast (fp32 parameters, the
# residual stream in bf16 or fp32)
_DEFAULT_AOT_DTYPES = (
    ("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("bf16", "fp32", "fp32"),  # forward
    ("fp32", "", "fp32"), ("bf16", "", "fp32"),  # backward
    ("fp32", "", ""), ("bf16", "", ""),  # column sums
)  # fmt: skip


def aot_specs(all_flag_combinations: bool = False) -> list[dict]:
    """Specs for kernels/aot.py: the row kernels for every BLOCK_N from 1 to MAX_BLOCK_N, the
    long-row and column-sum kernels; every input dtype, parameters in the input's dtype or in
    fp32 (autocast), and half activations added to an fp32 residual stream.

    By default each configuration is listed once, with every optional input present (residual,
    weight, bias, incoming dh, parameter gradients): a flag only removes loads and arithmetic
    from the same tile, so these are the heaviest variants. ``all_flag_combinations=True`` lists
    every combination of flags too (about ten times as many). Specs marked ``default`` (a few
    block sizes, fp32 and bf16-with-fp32-parameters) are the ones a quick check compiles.
    """
    bools = (True, False) if all_flag_combinations else (True,)
    specs = []

    def add(name: str, fn, signature: dict, constexprs: dict, flags: dict, num_warps: int) -> None:
        suffix = "".join(f"_{k.lower()}" for k, v in flags.items() if v) if all_flag_combinations else ""
        # (x or dy, residual, weight) dtypes, "" where the kernel has no such argument
        dtypes = tuple(
            signature.get(arg, "").removeprefix("*") for arg in ("DY" if "DY" in signature else "X", "RES", "W")
        )
        row_kernel = fn in (_layer_norm_fwd_kernel, _layer_norm_bwd_kernel)
        default = (
            not all_flag_combinations
            and dtypes in _DEFAULT_AOT_DTYPES
            and (not row_kernel or constexprs["BLOCK_N"] in _DEFAULT_AOT_BLOCK_N)
        )
        specs.append(
            dict(name=name + suffix, fn=fn, signature=signature, constexprs={**constexprs, **flags},
                 num_warps=num_warps, num_stages=1, default=default)
        )  # fmt: skip

    row_kernel_shapes = [_config(2**i) for i in range(MAX_BLOCK_N.bit_length())]
    long_rows = dict(CHUNK=LONG_ROW_CHUNK)
    for x_ty, res_ty, p_ty in _dtype_combinations():
        out_ty = res_ty if res_ty == "fp32" else x_ty  # the promoted dtype of x + residual
        tag = f"{x_ty}" + (f"_residual_{res_ty}" if res_ty != x_ty else "") + f"_params_{p_ty}"
        fwd_signature = {
            "X": f"*{x_ty}", "RES": f"*{res_ty}", "H": f"*{out_ty}", "Y": f"*{out_ty}", "W": f"*{p_ty}",
            "B": f"*{p_ty}", "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_res": "i32",
            "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
        }  # fmt: skip
        for residual, weight, bias in itertools.product(bools, repeat=3):
            flags = dict(HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias)
            for block_m, block_n, num_warps in row_kernel_shapes:
                shape = dict(BLOCK_M=block_m, BLOCK_N=block_n)
                add(f"layer_norm_fwd_block_n{block_n}_{tag}", _layer_norm_fwd_kernel, fwd_signature, shape, flags,
                    num_warps)  # fmt: skip
            add(f"layer_norm_fwd_long_rows_{tag}", _layer_norm_fwd_long_rows_kernel, fwd_signature, long_rows, flags,
                LONG_ROW_NUM_WARPS)  # fmt: skip
        if res_ty != x_ty:
            continue  # the backward sees only h, y and their gradients, all in out_ty
        bwd_signature = {
            "DY": f"*{x_ty}", "H": f"*{x_ty}", "W": f"*{p_ty}", "MEAN": "*fp32", "RSTD": "*fp32",
            "DH_IN": f"*{x_ty}", "DH": f"*{x_ty}", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32",
            "stride_dy": "i32", "stride_h": "i32", "stride_dh_in": "i32", "n_rows": "i32", "n_cols": "i32",
        }  # fmt: skip
        for weight, dh_in in itertools.product(bools, repeat=2):
            flags = dict(HAS_WEIGHT=weight, HAS_DH_IN=dh_in)
            for block_m, block_n, num_warps in row_kernel_shapes:
                # past PARAM_GRADS_IN_ROW_KERNEL_MAX the column-sum kernel forms the sums
                sums = bools if block_n <= PARAM_GRADS_IN_ROW_KERNEL_MAX else (False,)
                for sum_dw, sum_db in itertools.product(sums, repeat=2):
                    add(f"layer_norm_bwd_block_n{block_n}_{tag}", _layer_norm_bwd_kernel, bwd_signature,
                        dict(BLOCK_M=block_m, BLOCK_N=block_n), {**flags, "SUM_DW": sum_dw, "SUM_DB": sum_db},
                        num_warps)  # fmt: skip
            long_signature = {k: v for k, v in bwd_signature.items() if k not in ("DW_PARTIAL", "DB_PARTIAL")}
            add(f"layer_norm_bwd_long_rows_{tag}", _layer_norm_bwd_long_rows_kernel, long_signature, long_rows, flags,
                LONG_ROW_NUM_WARPS)  # fmt: skip
    for x_ty in _TRITON_DTYPES.values():
        signature = {
            "DY": f"*{x_ty}", "H": f"*{x_ty}", "MEAN": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32",
            "DB_PARTIAL": "*fp32", "stride_dy": "i32", "stride_h": "i32", "n_rows": "i32", "n_cols": "i32",
            "rows_per_group": "i32",
        }  # fmt: skip
        for sum_dw, sum_db in itertools.product(bools, repeat=2):
            add(f"layer_norm_column_sums_{x_ty}", _layer_norm_column_sums_kernel, signature,
                dict(BLOCK_M=COLUMN_SUMS_BLOCK_M, BLOCK_N=COLUMN_SUMS_BLOCK_N), dict(SUM_DW=sum_dw, SUM_DB=sum_db),
                COLUMN_SUMS_NUM_WARPS)  # fmt: skip
    return specs


def _dtype_combinations() -> list[tuple[str, str, str]]:
    """(x, residual, parameter) triton dtypes: same-dtype runs with parameters in that dtype or in
    fp32, and half activations beside an fp32 residual stream (either way round) with fp32 params."""
    combos = []
    for ty in _TRITON_DTYPES.values():
        combos += [(ty, ty, ty)] if ty == "fp32" else [(ty, ty, ty), (ty, ty, "fp32")]
    for half in ("fp16", "bf16"):
        combos += [(half, "fp32", "fp32"), ("fp32", half, "fp32")]
    return combos
