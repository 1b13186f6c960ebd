"""The ``triton`` attention backend: fused attention in the FlashAttention-2 style.

Forward: each program owns BLOCK_M queries of one (batch, head) and streams over the keys in
BLOCK_N tiles, keeping a running max ``m``, a running normaliser ``l`` and an fp32 output
accumulator (the "online softmax"). Scores never leave registers, so memory is O(T), not O(T^2).
It saves the log-sum-exp of every query row for the backward.

Backward: ``delta = rowsum(dO * O)`` first (a small preprocess kernel), then two kernels that
recompute the probabilities ``P = exp2(S - lse)`` tile by tile from the saved log-sum-exp:
one owns a block of keys and loops over queries (dK, dV), the other owns a block of queries
and loops over keys (dQ). No (Tq, Tk) matrix is ever stored and no atomics are needed.

Conventions used throughout:

* Scores are kept in base 2: ``log2(e)`` is folded into the softmax scale so the kernels call
  ``exp2``, which maps to one hardware instruction. The saved ``lse`` is in base 2 as well.
* Causal masks are aligned bottom-right: query i sees key j iff ``j <= i + (T_K - T_Q)``.
  Key tiles above the diagonal are never visited (loop bounds); tiles fully below it run an
  unmasked loop; only the few tiles on the diagonal (and the ragged last tile) pay for a mask.
* A query row that sees no key returns zeros; its ``lse`` is stored as +inf, which makes every
  recomputed probability exactly 0 in the backward, so its gradients are 0 rather than NaN.
* Dropout draws one Philox number per (batch*head, query, key) from ``tl.rand(seed, offset)``;
  the backward regenerates the same numbers from the same seed and offsets.
* ``UPCAST`` is True only under Triton's interpreter, whose bf16 arithmetic is wrong (NumPy has
  no bfloat16): tiles are converted to fp32 right after loading. On a GPU it is False and the
  ``tl.dot`` operands stay bf16/fp16 for the tensor cores.

The autograd wrapper and the ``torch.library`` custom ops (``gpt_kernels::flash_attention_fwd``
and ``gpt_kernels::flash_attention_bwd``) are at the bottom, so ``torch.compile`` traces
through ``kernels.attention`` without graph breaks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from kernels.triton import tuning

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634

# The fixed tile sizes used under the interpreter (autotune cannot run there). Unequal M and N
# so the diagonal logic is exercised; tests may change these to cover other shapes.
INTERPRET_CONFIG = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}
PREPROCESS_BLOCK_M = 64


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_range(start_m, T_Q, T_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key bounds for the query block starting at ``start_m``: ``[0, mid)`` needs no mask,
    ``[mid, hi)`` needs one (causal diagonal or the ragged end of the keys)."""
    if CAUSAL:
        shift = T_K - T_Q
        # the block's last query sees keys < start_m + BLOCK_M + shift; later tiles are skipped
        hi = tl.minimum(start_m + BLOCK_M + shift, T_K)
        hi = tl.maximum(hi, 0)
        # every query of the block sees the keys < start_m + shift + 1: whole tiles there need no mask
        mid = (tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N
        mid = tl.minimum(mid, hi)
    else:
        hi = T_K
        mid = (T_K // BLOCK_N) * BLOCK_N
    return mid, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
    seed, rng_base, T_Q, T_K, qk_scale, dropout_p, offs_m, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold the key tiles ``[lo, hi)`` into the running (acc, l, m) of one query block."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kt_ptrs = K_head + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd  # K^T tile: (D, BLOCK_N)
        v_ptrs = V_head + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < T_K, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < T_K, other=0.0)
        else:  # whole tiles inside the keys: no bounds checks, so the loads pipeline freely
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base 2
        if MASKED:
            visible = cols[None, :] < T_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (T_K - T_Q))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row that has seen no key yet keeps m = -inf: subtract 0, not -inf (inf - inf = NaN)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # the normaliser above counts every p; only the output sees the dropped ones
            rng_offs = rng_base + offs_m[:, None] * T_K + cols[None, :]
            p = tl.where(tl.rand(seed, rng_offs) >= dropout_p, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, T_K, T_Q_KEY, T_K_KEY, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # T_Q_KEY / T_K_KEY are power-of-two buckets of T_Q / T_K, read only by the autotuner's key.
    # Grid: (query blocks, batch * heads).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K_head = K + b * stride_kb + h * stride_kh
    V_head = V + b * stride_vb + h * stride_vh
    rng_base = bh.to(tl.int64) * T_Q * T_K  # dropout: one Philox counter per (bh, query, key)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    mid, hi = _key_range(start_m, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: tiles that every query of the block sees in full -- no mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
        seed, rng_base, T_Q, T_K, qk_scale, dropout_p, offs_m, 0, mid,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT, UPCAST,
    )  # fmt: skip
    # stage 2: the tiles on the causal diagonal and the ragged last tile -- masked
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
        seed, rng_base, T_Q, T_K, qk_scale, dropout_p, offs_m, mid, hi,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT, UPCAST,
    )  # fmt: skip

    seen = l_i > 0.0  # False only for rows that see no key at all: they output 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * T_Q + offs_m, lse, mask=row_ok)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id: the row term of the softmax backward (dropout included)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T_Q
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok, other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)


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
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < T_Q
        # rows past T_Q load q = dO = 0 and lse = +inf, so their probabilities are exactly 0
        qt = tl.load(Q_head + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :], other=0.0)  # fmt: skip
        do = tl.load(DO_head + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)  # fmt: skip
        lse = tl.load(LSE_row + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_row + rows, mask=row_ok, other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
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


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K, T_Q_KEY, T_K_KEY, sm_scale, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grid: (key blocks, batch * heads). Each program owns BLOCK_N keys and loops over queries.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols[:, None] < T_K
    # keys past T_K load as 0; their dK/dV rows are computed but never stored
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=col_ok, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=col_ok, other=0.0)  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    Q_head = Q + b * stride_qb + h * stride_qh
    DO_head = DO + b * stride_dob + h * stride_doh
    LSE_row = LSE + bh.to(tl.int64) * T_Q
    DELTA_row = DELTA + bh.to(tl.int64) * T_Q
    rng_base = bh.to(tl.int64) * T_Q * T_K

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, mid = _query_range(start_n, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1 (causal only): the query tiles on the diagonal -- masked
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q_head, DO_head, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
        seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, lo, mid,
        HEAD_DIM, BLOCK_M, True, DROPOUT, UPCAST,
    )  # fmt: skip
    # stage 2: the query tiles that see every key of the block -- no mask
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q_head, DO_head, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
        seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, mid, T_Q,
        HEAD_DIM, BLOCK_M, False, DROPOUT, UPCAST,
    )  # fmt: skip

    dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok)  # fmt: skip
    tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok)  # fmt: skip


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
    seed, rng_base, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key tiles ``[lo, hi)``."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = K_head + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
        vt_ptrs = V_head + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd  # V^T tile: (D, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < T_K, other=0.0)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < T_K, other=0.0)
        else:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
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
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T_Q, T_K, T_Q_KEY, T_K_KEY, sm_scale, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grid: (query blocks, batch * heads). Each program owns BLOCK_M queries and loops over keys.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T_Q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T_Q + rows, mask=row_ok, other=0.0)
    K_head = K + b * stride_kb + h * stride_kh
    V_head = V + b * stride_vb + h * stride_vh
    rng_base = bh.to(tl.int64) * T_Q * T_K

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    mid, hi = _key_range(start_m, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
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
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, per kernel, head-dim group, element size
# and dropout, for sm_80/sm_90. Larger query tiles for the forward and dQ, larger key tiles for
# dK/dV; 8 warps where the fp32 accumulators are big (D = 128); dropout's Philox state needs
# registers, so its lists use smaller tiles; fp32 inputs take twice the bytes per element. Every
# entry compiles for sm_80 and sm_90 without register spills and within shared memory
# (``python -m kernels.aot --all``; tests/test_aot.py).
_Cfg = tuple[int, int, int, int]
_CONFIGS: dict[tuple[str, str, str], dict[str, list[_Cfg]]] = {
    # kind, head dims, precision: {"plain": [...], "dropout": [...]}
    ("fwd", "d16-32", "16bit"): dict(
        plain=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        dropout=[(64, 64, 4, 4), (128, 64, 8, 3)]),
    ("fwd", "d64", "16bit"): dict(
        plain=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        dropout=[(64, 64, 4, 4), (128, 64, 8, 3)]),
    ("fwd", "d128", "16bit"): dict(
        plain=[(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        dropout=[(64, 32, 4, 3)]),
    ("fwd", "d16-32", "fp32"): dict(plain=[(64, 32, 4, 2), (64, 64, 4, 2)], dropout=[(64, 32, 4, 2)]),
    ("fwd", "d64", "fp32"): dict(plain=[(64, 32, 4, 2), (64, 64, 4, 2)], dropout=[(64, 32, 4, 2)]),
    ("fwd", "d128", "fp32"): dict(plain=[(32, 32, 4, 2), (64, 32, 8, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dkdv", "d16-32", "16bit"): dict(
        plain=[(32, 128, 4, 3), (32, 64, 4, 4), (32, 64, 4, 3)],
        dropout=[(32, 64, 4, 4), (32, 64, 4, 3)]),
    ("bwd_dkdv", "d64", "16bit"): dict(
        plain=[(32, 64, 4, 4), (32, 128, 8, 3), (32, 64, 4, 3)],
        dropout=[(32, 64, 4, 4), (32, 64, 4, 3)]),
    ("bwd_dkdv", "d128", "16bit"): dict(
        plain=[(32, 64, 4, 3), (32, 64, 8, 2)],
        dropout=[(32, 64, 8, 2), (16, 64, 4, 3)]),
    ("bwd_dkdv", "d16-32", "fp32"): dict(plain=[(16, 64, 4, 2), (16, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dkdv", "d64", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dkdv", "d128", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dq", "d16-32", "16bit"): dict(
        plain=[(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
        dropout=[(128, 32, 4, 3), (64, 32, 4, 4)]),
    ("bwd_dq", "d64", "16bit"): dict(
        plain=[(128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
        dropout=[(64, 32, 4, 4), (128, 32, 8, 3)]),
    ("bwd_dq", "d128", "16bit"): dict(
        plain=[(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)],
        dropout=[(128, 32, 8, 2), (64, 32, 4, 3)]),
    ("bwd_dq", "d16-32", "fp32"): dict(plain=[(64, 32, 4, 2), (32, 32, 4, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dq", "d64", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dq", "d128", "fp32"): dict(plain=[(32, 32, 4, 2), (64, 32, 8, 2)], dropout=[(32, 32, 4, 2)]),
}  # fmt: skip
_KERNELS = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}
# the autotuner re-tunes per distinct key: bucket the lengths so decoding (T grows by 1) does not
_TUNE_KEY = ["T_Q_KEY", "T_K_KEY", "CAUSAL"]


def _configs(kind: str, head_dim: int, fp32: bool, dropout: bool) -> list[_Cfg]:
    group = "d16-32" if head_dim <= 32 else f"d{head_dim}"
    return _CONFIGS[(kind, group, "fp32" if fp32 else "16bit")]["dropout" if dropout else "plain"]


def _kernel(kind: str, head_dim: int, dtype: torch.dtype, dropout: bool) -> tuple[object, dict]:
    """The kernel to launch and the launch-time meta-parameters it still needs."""
    if INTERPRET and not tuning.limited():  # no GPU timer for autotune: one fixed, small config
        block_m, block_n = INTERPRET_CONFIG[kind]
        return _KERNELS[kind], dict(BLOCK_M=block_m, BLOCK_N=block_n)
    name, configs = _candidates(kind, head_dim, dtype == torch.float32, dropout)
    return tuning.autotuned(name, _KERNELS[kind], configs, _TUNE_KEY), {}


@functools.cache
def _candidates(kind: str, head_dim: int, fp32: bool, dropout: bool) -> tuple[str, list[triton.Config]]:
    """The autotuner's name for this kernel variant, and its candidate configs."""
    configs = [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
        for m, n, w, s in _configs(kind, head_dim, fp32, dropout)
    ]
    return f"attn_{kind}[D{head_dim},{'fp32' if fp32 else '16bit'}{',dropout' * dropout}]", configs


# Tests set this to fill every output buffer with NaN before the kernels run, so an element a
# kernel forgot to write fails the comparison instead of passing as whatever memory held.
POISON_OUTPUTS = False


def _new_output(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = like.new_empty(shape, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _flash_fwd(q, k, v, causal: bool, dropout_p: float, scale: float, seed: int):
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    o = _new_output(q, (B, H, T_q, D))
    lse = _new_output(q, (B, H, T_q), torch.float32)
    kernel, meta = _kernel("fwd", D, q.dtype, dropout_p > 0.0)
    grid = lambda m: (triton.cdiv(T_q, m["BLOCK_M"]), B * H)
    kernel[grid](
        q, k, v, o, lse, seed, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T_q, T_k, _bucket(T_q), _bucket(T_k), scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
        HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, **meta,
    )  # fmt: skip
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal: bool, dropout_p: float, scale: float, seed: int):
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    delta = _new_output(lse, lse.shape)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T_q, PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T_q, HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M,
    )  # fmt: skip
    dq, dk, dv = _new_output(q, q.shape), _new_output(k, k.shape), _new_output(v, v.shape)
    common = (H, T_q, T_k, _bucket(T_q), _bucket(T_k), scale, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p))
    flags = dict(HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET)

    kernel, meta = _kernel("bwd_dkdv", D, q.dtype, dropout_p > 0.0)
    grid = lambda m: (triton.cdiv(T_k, m["BLOCK_N"]), B * H)
    kernel[grid](
        q, k, v, do, lse, delta, dk, dv, seed,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *common, **flags, **meta,
    )  # fmt: skip

    kernel, meta = _kernel("bwd_dq", D, q.dtype, dropout_p > 0.0)
    grid = lambda m: (triton.cdiv(T_q, m["BLOCK_M"]), B * H)
    kernel[grid](
        q, k, v, do, lse, delta, dq, seed,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *common, **flags, **meta,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------
# The kernels are opaque to torch.compile: it sees two ops with fake (shape-only) versions.
# The dropout seed travels as a CPU tensor drawn from torch's generator, so the graph has no
# data-dependent Python int in it and torch.manual_seed makes dropout reproducible.


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op(
    "gpt_kernels::flash_attention_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool causal, float dropout_p, float scale, Tensor? seed)"
    " -> (Tensor, Tensor)",
)
def flash_attention_fwd(q, k, v, causal, dropout_p, scale, seed):
    """Returns ``(out, lse)``; ``lse`` (fp32, (B, H, Tq), base 2) is kept for the backward."""
    with _device_guard(q):
        return _flash_fwd(q, k, v, causal, dropout_p, scale, _seed_value(seed))


@flash_attention_fwd.register_fake
def _(q, k, v, causal, dropout_p, scale, seed):
    B, H, T_q, D = q.shape
    return q.new_empty((B, H, T_q, D)), q.new_empty((B, H, T_q), dtype=torch.float32)


@torch.library.custom_op(
    "gpt_kernels::flash_attention_bwd",
    mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float dropout_p,"
    " float scale, Tensor? seed) -> (Tensor, Tensor, Tensor)",
)
def flash_attention_bwd(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    """Returns ``(dq, dk, dv)``, recomputing the probabilities from ``lse``."""
    with _device_guard(q):
        return _flash_bwd(do, q, k, v, o, lse, causal, dropout_p, scale, _seed_value(seed))


@flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, scale, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_bwd(
        do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, ctx.scale, seed
    )
    return dq, dk, dv, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Backend interface (inputs are validated by kernels.attention)
# --------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float
) -> torch.Tensor:
    """Fused attention over (B, H, T, D) tensors; see ``kernels.attention`` for the contract."""
    # the Philox seed comes from torch's (CPU) generator: torch.manual_seed makes dropout repeatable
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    out, _ = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, causal, dropout_p, scale, seed)
    return out


def unsupported(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> str | None:
    """None when the triton backend can run this call, else why not and what to use instead."""
    if op != "attention":
        return f"the triton attention module has no op {op!r}"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return (
            f"head_dim {head_dim} is not supported by the triton kernel (supported: "
            f"{', '.join(map(str, HEAD_DIMS))}); use backend 'sdpa' or 'torch'"
        )
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the kernel's grid limit of 65535; use backend 'sdpa'"
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return "the triton kernel needs an sm_80 (Ampere) or newer GPU; use backend 'sdpa'"
        return None
    if q.device.type == "cpu":
        if INTERPRET:
            return None
        return "triton needs CUDA tensors; on the CPU use backend 'sdpa' (or set TRITON_INTERPRET=1 for slow testing)"
    return f"triton needs CUDA tensors, got {q.device.type} tensors; use backend 'sdpa' or 'torch'"


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py)
# --------------------------------------------------------------------------------------------


def _signature(fn, pointer_types: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    """Triton types of ``fn``'s non-constexpr arguments: pointers as given, named floats fp32, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        sig[name] = pointer_types.get(name) or ("fp32" if name in floats else "i32")
    return sig


def _in_ci_set(head_dim: int, dtype: str, dropout: bool) -> bool:
    """The configurations the default AOT run (and CI) compiles: the first config of every bf16
    list, plus dropout at GPT-2's head dim; ``python -m kernels.aot --all`` compiles the rest."""
    return dtype == "bf16" and (not dropout or head_dim == 64)


def aot_specs() -> list[dict]:
    """One spec per configuration the autotuner may launch: every (kernel, head dim, element
    size, dropout, config), causal (the training path; the non-causal one is a subset of its
    code). Innermost strides are pinned to 1 and row strides marked multiples of 16, as the JIT
    specialises contiguous inputs. ``default`` marks the few that CI compiles (``_in_ci_set``)."""
    specs = []
    floats = ("qk_scale", "sm_scale", "dropout_p", "dropout_scale")
    tensors = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")
    for head_dim in HEAD_DIMS:
        for dtype in ("bf16", "fp32"):
            pointers = {n: f"*{dtype}" for n in tensors} | {"LSE": "*fp32", "DELTA": "*fp32"}
            for (kind, fn), dropout in itertools.product(_KERNELS.items(), (False, True)):
                unit_strides = {n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")}
                configs = _configs(kind, head_dim, dtype == "fp32", dropout)
                for i, (block_m, block_n, warps, stages) in enumerate(configs):
                    constexprs = dict(
                        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                        CAUSAL=True, DROPOUT=dropout, UPCAST=False, **unit_strides,
                    )  # fmt: skip
                    tag = f"D{head_dim},{dtype},M{block_m},N{block_n},w{warps},s{stages}{',dropout' * dropout}"
                    specs.append(dict(
                        name=f"attn_{kind}[{tag}]", fn=fn,
                        signature=_signature(fn, pointers, floats, constexprs), constexprs=constexprs,
                        num_warps=warps, num_stages=stages, default=i == 0 and _in_ci_set(head_dim, dtype, dropout),
                        divisible_by_16=[n for n in fn.arg_names if n.startswith("stride_") and n not in unit_strides],
                    ))  # fmt: skip
        fn = _attn_bwd_preprocess_kernel
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK_M, stride_od=1, stride_dod=1)
        specs.append(dict(
            name=f"attn_bwd_preprocess[D{head_dim},bf16]", fn=fn,
            signature=_signature(fn, {"Out": "*bf16", "DO": "*bf16", "DELTA": "*fp32"}, floats, constexprs),
            constexprs=constexprs, num_warps=4, num_stages=1, default=head_dim >= 64,
            divisible_by_16=["stride_ob", "stride_oh", "stride_ot", "stride_dob", "stride_doh", "stride_dot"],
        ))  # fmt: skip
    return specs
