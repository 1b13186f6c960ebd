"""Fused attention, backward pass (FlashAttention-2 style); the overview is in attention.py.

``delta = rowsum(dO * O)`` first (a small preprocess kernel), then one kernel launched twice,
recomputing the probabilities ``P = exp2(S - lse)`` tile by tile from the saved log-sum-exp:
with KEY_BLOCKS a program owns a block of keys and loops over queries (dK, dV); without, it
owns a block of queries and loops over keys (dQ). No (Tq, Tk) matrix is ever stored and no
atomics are needed. Rows past T_Q load q = dO = 0 and lse = +inf, so their probabilities are
exactly 0; keys past T_K load as 0 and their dK/dV rows are never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.attention_forward import (
    LOG2E,
    _key_range,
    _load_two,
    _program_head,
    _rows_ptrs,
    _store_rows,
)
from kernels.triton.common import INTERPRET, device_guard, new_output
from kernels.triton.configs import PREPROCESS_BLOCK_M, attention_kernel


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id: the row term of the softmax backward (dropout included)."""
    bh, b, h = _program_head(H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ptrs, inside = _rows_ptrs(Out + b * stride_ob + h * stride_oh, offs_m, stride_ot, stride_od, T_Q, HEAD_DIM)
    do_ptrs, _ = _rows_ptrs(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, stride_dod, T_Q, HEAD_DIM)
    o, do = _load_two(o_ptrs, do_ptrs, inside, True)
    tl.store(DELTA + bh.to(tl.int64) * T_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < T_Q)


@triton.jit
def _query_range(start_n, T_Q, T_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Query bounds for the key block starting at ``start_n``: ``[lo, mid)`` needs the causal
    mask, ``[mid, T_Q)`` sees the whole block. Queries before ``lo`` see none of it (skipped)."""
    if CAUSAL:
        shift = T_K - T_Q
        first = tl.maximum(start_n - shift, 0)  # the first query that sees key start_n
        lo = (first // BLOCK_M) * BLOCK_M
        full = tl.maximum(start_n + BLOCK_N - 1 - shift, 0)  # the first query that sees the whole block
        mid = tl.cdiv(full, BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), tl.cdiv(T_Q, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        mid = 0
    return lo, mid


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q_head, DO_head, LSE_row, DELTA_row,
    stride_qt, stride_qd, stride_dot, stride_dod,
    seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over the query tiles ``[lo, hi)``, working on the
    transposed tiles (keys along rows) so the key block stays the left operand of every dot."""
    offs_d = tl.arange(0, HEAD_DIM)  # the loop spells out its tiles: see _attn_fwd_inner
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = Q_head + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd  # Q^T: (D, BLOCK_M)
        do_ptrs = DO_head + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod
        qt = tl.load(qt_ptrs, mask=rows[None, :] < T_Q, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < T_Q, other=0.0)
        if UPCAST:
            qt, do = qt.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE_row + rows, mask=rows < T_Q, other=float("inf"))
        delta = tl.load(DELTA_row + rows, mask=rows < T_Q, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # P^T: (BLOCK_N, BLOCK_M)
        if MASKED:
            pt = tl.where(cols[:, None] <= rows[None, :] + (T_K - T_Q), pt, 0.0)
        if DROPOUT:
            keep = tl.rand(seed, rng_base + rows[None, :] * T_K + cols[:, None]) >= dropout_p
            pt_dropped = tl.where(keep, pt * dropout_scale, 0.0)
        else:
            pt_dropped = pt
        dv = tl.dot(pt_dropped.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
        if DROPOUT:
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        dst = pt * (dpt - delta[None, :])  # dS^T, the gradient of the (natural-log) scores
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
    seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key tiles ``[lo, hi)``."""
    offs_d = tl.arange(0, HEAD_DIM)  # the loop spells out its tiles: see _attn_fwd_inner
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_head + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
        vt_ptrs = V_head + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd  # V^T: (D, BLOCK_N)
        k = tl.load(k_ptrs, mask=cols[:, None] < T_K, other=0.0) if MASKED else tl.load(k_ptrs)
        vt = tl.load(vt_ptrs, mask=cols[None, :] < T_K, other=0.0) if MASKED else tl.load(vt_ptrs)
        if UPCAST:
            k, vt = k.to(tl.float32), vt.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < T_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + (T_K - T_Q))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt)
        if DROPOUT:
            keep = tl.rand(seed, rng_base + rows[:, None] * T_K + cols[None, :]) >= dropout_p
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K, T_Q_KEY, T_K_KEY, sm_scale, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, KEY_BLOCKS: tl.constexpr,
):  # fmt: skip
    # Grid: (key blocks with KEY_BLOCKS, else query blocks; batch * heads). KEY_BLOCKS is a
    # constexpr: each launch compiles only its own branch, and never touches the other's outputs.
    # Each branch forms its per-head pointers after its first loads: formed before them (shared),
    # the dQ branch took a quarter more registers on sm_90 (python -m kernels.aot).
    bh, b, h = _program_head(H)
    if KEY_BLOCKS:  # this program's BLOCK_N keys: dK and dV, looping over the queries that see them
        start_n = tl.program_id(0) * BLOCK_N
        cols = start_n + tl.arange(0, BLOCK_N)
        k_ptrs, inside = _rows_ptrs(K + b * stride_kb + h * stride_kh, cols, stride_kt, stride_kd, T_K, HEAD_DIM)
        v_ptrs, _ = _rows_ptrs(V + b * stride_vb + h * stride_vh, cols, stride_vt, stride_vd, T_K, HEAD_DIM)
        k, v = _load_two(k_ptrs, v_ptrs, inside, UPCAST)
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        LSE_row = LSE + bh.to(tl.int64) * T_Q
        DELTA_row = DELTA + bh.to(tl.int64) * T_Q
        rng_base = bh.to(tl.int64) * T_Q * T_K  # dropout: the forward's Philox counters
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        lo, mid = _query_range(start_n, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
        # the query tiles on the causal diagonal (causal only): masked; then those that see every key
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
            seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, lo, mid,
            HEAD_DIM, BLOCK_M, True, DROPOUT, UPCAST,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
            seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, mid, T_Q,
            HEAD_DIM, BLOCK_M, False, DROPOUT, UPCAST,
        )  # fmt: skip
        dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
        _store_rows(DK + b * stride_dkb + h * stride_dkh, cols, stride_dkt, stride_dkd, T_K, dk, HEAD_DIM)
        _store_rows(DV + b * stride_dvb + h * stride_dvh, cols, stride_dvt, stride_dvd, T_K, dv, HEAD_DIM)
    else:  # this program's BLOCK_M queries: dQ, looping over the keys they see
        start_m = tl.program_id(0) * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        q_ptrs, inside = _rows_ptrs(Q + b * stride_qb + h * stride_qh, rows, stride_qt, stride_qd, T_Q, HEAD_DIM)
        DO_head = DO + b * stride_dob + h * stride_doh
        do_ptrs, _ = _rows_ptrs(DO_head, rows, stride_dot, stride_dod, T_Q, HEAD_DIM)
        q, do = _load_two(q_ptrs, do_ptrs, inside, UPCAST)
        lse = tl.load(LSE + bh.to(tl.int64) * T_Q + rows, mask=rows < T_Q, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * T_Q + rows, mask=rows < T_Q, other=0.0)
        K_head = K + b * stride_kb + h * stride_kh
        V_head = V + b * stride_vb + h * stride_vh
        rng_base = bh.to(tl.int64) * T_Q * T_K
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        mid, hi = _key_range(start_m, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
        # keys every query of the block sees: no mask; then the causal diagonal and the ragged end: masked
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
            seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, 0, mid,
            HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT, UPCAST,
        )  # fmt: skip
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
            seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, mid, hi,
            HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT, UPCAST,
        )  # fmt: skip
        _store_rows(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dqt, stride_dqd, T_Q, dq * sm_scale, HEAD_DIM)


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, dropout_p: float, scale: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns ``(dq, dk, dv)``, recomputing the probabilities from the forward's ``lse``."""
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    delta = new_output(lse.shape, lse.dtype, lse.device)
    dq, dk, dv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    args = (
        q, k, v, do, lse, delta, dq, dk, dv, seed,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        H, T_q, T_k, triton.next_power_of_2(T_q), triton.next_power_of_2(T_k),
        scale, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
    )  # fmt: skip
    flags = dict(HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET)
    dkdv, dkdv_meta = attention_kernel("bwd_dkdv", _attn_bwd_kernel, D, q.dtype, dropout_p > 0.0)
    dq_kernel, dq_meta = attention_kernel("bwd_dq", _attn_bwd_kernel, D, q.dtype, dropout_p > 0.0)
    with device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(T_q, PREPROCESS_BLOCK_M), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, T_q, HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M,
        )  # fmt: skip
        dkdv[lambda m: (triton.cdiv(T_k, m["BLOCK_N"]), B * H)](*args, **flags, KEY_BLOCKS=True, **dkdv_meta)
        dq_kernel[lambda m: (triton.cdiv(T_q, m["BLOCK_M"]), B * H)](*args, **flags, KEY_BLOCKS=False, **dq_meta)
    return dq, dk, dv
