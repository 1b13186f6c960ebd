"""Fused LayerNorm in Triton, backward pass; the design is described in layer_norm.py.

With xhat = (h - mean) * rstd and g = dy * weight, dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
is per row. dweight and dbias are column sums: a few programs per SM each walk their share of
the rows, keep running column sums in registers and write one partial row, which torch sums
(no atomics, deterministic). Rows longer than PARAM_GRADS_IN_ROW_KERNEL_MAX leave no registers
for the running sums: there the row kernel computes dh only and a column-tiled kernel sums.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gptforge.kernels.triton.common import as_rows, contiguous_or_none, device_guard, new_output
from gptforge.kernels.triton.configs import (
    COLUMN_SUMS_BLOCK_M,
    COLUMN_SUMS_BLOCK_N,
    COLUMN_SUMS_NUM_WARPS,
    INTERPRETER_SM_COUNT,
    LONG_ROW_CHUNK,
    LONG_ROW_NUM_WARPS,
    MAX_BLOCK_N,
    PARAM_GRADS_IN_ROW_KERNEL_MAX,
    WARPS_PER_SM,
    layer_norm_config,
)


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
# Launcher
# --------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


def backward(
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
    h_rows, dy_rows = as_rows(h), as_rows(dy)
    dh_in_rows = as_rows(dh_in) if dh_in is not None else dy_rows
    weight = contiguous_or_none(weight)
    n_rows = h_rows.shape[0]
    dh = new_output(h.shape, h.dtype, h.device)
    n_param_grads = int(need_dweight) + int(need_dbias)
    if n_rows == 0:
        if dh_in is not None:
            dh.copy_(dh_in)
        return dh, torch.zeros(n_param_grads, n_cols, dtype=torch.float32, device=h.device)

    block_m, block_n, num_warps = layer_norm_config(n_cols)
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
    partials = new_output((n_param_grads, n_partials, n_cols), torch.float32, h.device)
    dw_partial = partials[0] if need_dweight else None
    db_partial = partials[-1] if need_dbias else None
    unused = mean  # stands in for absent optional tensors; never read or written
    w_arg = weight if weight is not None else unused
    strides = (dy_rows.stride(0), h_rows.stride(0), dh_in_rows.stride(0), n_rows, n_cols)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_DH_IN=dh_in is not None)

    with device_guard(h):
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
