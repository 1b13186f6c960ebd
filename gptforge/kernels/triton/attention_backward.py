"""Fused attention, backward pass (FlashAttention-2 style); the overview is in attention.py.

``delta = rowsum(dO * O)`` first (a small preprocess kernel), then one kernel launched twice,
recomputing the probabilities ``P = exp2(S - lse)`` tile by tile from the saved log-sum-exp:
with KEY_BLOCKS a program owns a block of keys and loops over queries (dK, dV); without, it
owns a block of queries and loops over keys (dQ). No (Tq, Tk) matrix is ever stored and no
atomics are needed. Rows past T_Q load q = dO = 0 and lse = +inf, so their probabilities are
exactly 0; keys past T_K load as 0 and their dK/dV rows are never stored.

Besides the forward's switches (LONGEST_FIRST, TMA) two more are the tutorial's backward
(Triton's fused-attention tutorial, with its 32 x 128 / 128 x 32 tiles in configs.py):
``PRESCALED`` multiplies the operand a program keeps resident (K for dK/dV, Q for dQ) by the
softmax scale once, so the scores come out of the dot in base 2 with no multiply per score;
``INTERIOR_UNMASKED`` loads the dK/dV program's query tiles that lie wholly before T_Q without
bounds masks (only the ragged last one keeps them).

Packed documents (``DOCUMENTS``, set by the launcher): ``STARTS`` holds each position's
document start, ``ENDS`` its document's end (exclusive), both int32 (B, T). The dQ program
walks keys as the forward does (attention_forward._document_keys); the dK/dV program stops its
query loop at the end of the last document its keys belong to, and runs unmasked only over
the query tiles wholly inside its first key's document. Off, both are None.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptforge.kernels.triton.attention_forward import (
    LOG2E,
    _document_keys,
    _key_range,
    _load_two,
    _program_block,
    _rng_counters,
    _rows_desc,
    _rows_ptrs,
    _store_rows,
    launch_grid,
)
from gptforge.kernels.triton.common import INTERPRET, device_guard, new_output, set_descriptor_allocator
from gptforge.kernels.triton.configs import PREPROCESS_BLOCK_M, attention_kernel, philox_32bit


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id: the row term of the softmax backward (dropout included)."""
    block, bh, b, h = _program_block(H, False, False)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
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
    dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row,
    stride_qt, stride_qd, stride_dot, stride_dod,
    seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, lo, hi, STARTS_row,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, BOUNDED: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRESCALED: tl.constexpr, TMA: tl.constexpr,
    DOCUMENTS: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over the query tiles ``[lo, hi)``, working on the
    transposed tiles (keys along rows) so the key block stays the left operand of every dot.
    MASKED: apply the causal mask (and with DOCUMENTS the document mask, from the rows'
    document starts at ``STARTS_row``); BOUNDED: the tiles may reach past T_Q (mask the loads)."""
    offs_d = tl.arange(0, HEAD_DIM)  # the loop spells out its tiles: see _attn_fwd_inner
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        if TMA:  # rows past T_Q come back as 0 from the copy engine
            qt = tl.trans(Q_src.load([start_m, 0]))
            do = DO_src.load([start_m, 0])
        else:
            qt_ptrs = Q_src + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd  # Q^T: (D, BLOCK_M)
            do_ptrs = DO_src + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod
            if BOUNDED:
                qt = tl.load(qt_ptrs, mask=rows[None, :] < T_Q, other=0.0)
                do = tl.load(do_ptrs, mask=rows[:, None] < T_Q, other=0.0)
            else:
                qt, do = tl.load(qt_ptrs), tl.load(do_ptrs)
        if UPCAST:
            qt, do = qt.to(tl.float32), do.to(tl.float32)
        if BOUNDED:
            lse = tl.load(LSE_row + rows, mask=rows < T_Q, other=float("inf"))
            delta = tl.load(DELTA_row + rows, mask=rows < T_Q, other=0.0)
        else:
            lse = tl.load(LSE_row + rows)
            delta = tl.load(DELTA_row + rows)
        if PRESCALED:  # k carries the scale already
            pt = tl.math.exp2(tl.dot(k, qt) - lse[None, :])  # P^T: (BLOCK_N, BLOCK_M)
        else:
            pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])
        if MASKED:
            visible = cols[:, None] <= rows[None, :] + (T_K - T_Q)
            if DOCUMENTS:
                visible = visible & (cols[:, None] >= tl.load(STARTS_row + rows, mask=rows < T_Q, other=0)[None, :])
            pt = tl.where(visible, pt, 0.0)
        if DROPOUT:
            keep = tl.rand(seed, rng_base + rows[None, :] * rng_row + cols[:, None]) >= dropout_p
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
    dq, q, do, lse, delta, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
    seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, lo, hi, starts_q, gap_at, gap,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRESCALED: tl.constexpr, TMA: tl.constexpr,
    DOCUMENTS: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key tiles ``[lo, hi)``; with DOCUMENTS the
    mask also hides keys before each row's document start ``starts_q``, and the masked loop
    skips ``gap`` keys from ``gap_at``, as the forward's does."""
    offs_d = tl.arange(0, HEAD_DIM)  # the loop spells out its tiles: see _attn_fwd_inner
    for start_n in range(lo, hi, BLOCK_N):
        if DOCUMENTS and MASKED:
            start_n = tl.where(start_n >= gap_at, start_n + gap, start_n)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = K_src.load([start_n, 0])
            vt = tl.trans(V_src.load([start_n, 0]))
        else:
            k_ptrs = K_src + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
            vt_ptrs = V_src + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd  # V^T: (D, BLOCK_N)
            k = tl.load(k_ptrs, mask=cols[:, None] < T_K, other=0.0) if MASKED else tl.load(k_ptrs)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < T_K, other=0.0) if MASKED else tl.load(vt_ptrs)
        if UPCAST:
            k, vt = k.to(tl.float32), vt.to(tl.float32)
        if PRESCALED:  # q carries the scale already
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) - lse[:, None])
        else:
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < T_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + (T_K - T_Q))
            if DOCUMENTS:
                visible = visible & (cols[None, :] >= starts_q[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt)
        if DROPOUT:
            keep = tl.rand(seed, rng_base + rows[:, None] * rng_row + cols[None, :]) >= dropout_p
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _prescale(resident, qk_scale, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``resident * qk_scale`` rounded to the input dtype, as the tensor cores will read it.
    That rounding is the switch's price: the scores no longer see exactly the forward's
    operands (in the parity tests the bf16 gradients' error against float64 grew by up to
    about 1.5x, within the tolerance)."""
    scaled = resident.to(tl.float32) * qk_scale
    if UPCAST and dtype == tl.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates; round to nearest even on the bits, as a GPU does
        bits = scaled.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    scaled = scaled.to(dtype)
    if UPCAST:
        scaled = scaled.to(tl.float32)
    return scaled


@triton.jit
def _operands(
    A, B, C, D, b, h, start, rows, T, T_OTHER, qk_scale,
    stride_ab, stride_ah, stride_at, stride_ad, stride_bb, stride_bh, stride_bt, stride_bd,
    stride_cb, stride_ch, stride_ct, stride_db, stride_dh, stride_dt,
    BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRESCALED: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """A backward program's operands in head (b, h): the tiles of A and B it keeps for its whole
    loop, rows ``rows`` (from ``start``; past T as 0; fp32 with UPCAST; A times the softmax
    scale with PRESCALED), and the sources of C and D, whose (T_OTHER, HEAD_DIM) rows it
    streams: tensor descriptors in tiles of OTHER_BLOCK rows with TMA, else pointers to the head.
    The sources are formed after the loads: formed before them, the dQ program took a quarter
    more registers on sm_90 (python -m gptforge.kernels.aot)."""
    if TMA:
        a_tile = _rows_desc(A + b * stride_ab + h * stride_ah, T, stride_at, BLOCK, HEAD_DIM).load([start, 0])
        b_tile = _rows_desc(B + b * stride_bb + h * stride_bh, T, stride_bt, BLOCK, HEAD_DIM).load([start, 0])
        if UPCAST:
            a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
        C_src = _rows_desc(C + b * stride_cb + h * stride_ch, T_OTHER, stride_ct, OTHER_BLOCK, HEAD_DIM)
        D_src = _rows_desc(D + b * stride_db + h * stride_dh, T_OTHER, stride_dt, OTHER_BLOCK, HEAD_DIM)
    else:
        a_ptrs, inside = _rows_ptrs(A + b * stride_ab + h * stride_ah, rows, stride_at, stride_ad, T, HEAD_DIM)
        b_ptrs, _ = _rows_ptrs(B + b * stride_bb + h * stride_bh, rows, stride_bt, stride_bd, T, HEAD_DIM)
        a_tile, b_tile = _load_two(a_ptrs, b_ptrs, inside, UPCAST)
        C_src = C + b * stride_cb + h * stride_ch
        D_src = D + b * stride_db + h * stride_dh
    if PRESCALED:
        a_tile = _prescale(a_tile, qk_scale, A.dtype.element_ty, UPCAST)
    return a_tile, b_tile, C_src, D_src


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, STARTS, ENDS, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K, BH_KEY, T_Q_KEY, T_K_KEY, sm_scale, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PHILOX_32: tl.constexpr,
    KEY_BLOCKS: tl.constexpr, LONGEST_FIRST: tl.constexpr, TMA: tl.constexpr,
    PRESCALED: tl.constexpr, INTERIOR_UNMASKED: tl.constexpr, DOCUMENTS: tl.constexpr,
):  # fmt: skip
    # Grid: (key blocks with KEY_BLOCKS, else query blocks; batch * heads), swapped with
    # LONGEST_FIRST. KEY_BLOCKS is a constexpr: each launch compiles only its own branch, and
    # never touches the other's outputs. Each branch forms its per-head pointers after its
    # first loads (_operands). Causal: early keys are seen most, late queries see most keys, so
    # LONGEST_FIRST launches dQ's blocks in reverse (_program_block).
    block, bh, b, h = _program_block(H, LONGEST_FIRST, not KEY_BLOCKS)
    if KEY_BLOCKS:  # this program's BLOCK_N keys: dK and dV, looping over the queries that see them
        start_n = block * BLOCK_N
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v, Q_src, DO_src = _operands(K, V, Q, DO, b, h, start_n, cols, T_K, T_Q, qk_scale, stride_kb, stride_kh,
            stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, stride_qb, stride_qh, stride_qt,
            stride_dob, stride_doh, stride_dot, BLOCK_N, BLOCK_M, HEAD_DIM, PRESCALED, UPCAST, TMA)  # fmt: skip
        LSE_row = LSE + bh.to(tl.int64) * T_Q
        DELTA_row = DELTA + bh.to(tl.int64) * T_Q
        rng_base, rng_row = _rng_counters(bh, T_Q, T_K, PHILOX_32)  # dropout: the forward's Philox counters
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        lo, mid = _query_range(start_n, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
        STARTS_row = STARTS
        if DOCUMENTS:
            STARTS_row = STARTS + b * T_Q
        # the query tiles on the causal diagonal (causal only): masked; then those that see every key
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
            seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, lo, mid, STARTS_row,
            HEAD_DIM, BLOCK_M, True, True, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
        )  # fmt: skip
        if DOCUMENTS:
            # past the diagonal: the tiles wholly inside the first key's document see every key
            # unmasked; the rest, up to the end of the last key's document, take the mask
            ENDS_row = ENDS + b * T_Q
            own = tl.maximum((tl.load(ENDS_row + start_n) // BLOCK_M) * BLOCK_M, mid)
            end = tl.cdiv(tl.load(ENDS_row + tl.minimum(start_n + BLOCK_N, T_K) - 1), BLOCK_M) * BLOCK_M
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
                seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, mid, own, STARTS_row,
                HEAD_DIM, BLOCK_M, False, not INTERIOR_UNMASKED, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
            )  # fmt: skip
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
                seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, own, end, STARTS_row,
                HEAD_DIM, BLOCK_M, True, True, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
            )  # fmt: skip
        elif INTERIOR_UNMASKED:  # the tiles wholly before T_Q without bounds masks, then the ragged one
            interior = tl.maximum((T_Q // BLOCK_M) * BLOCK_M, mid)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
                seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, mid, interior, STARTS,
                HEAD_DIM, BLOCK_M, False, False, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
            )  # fmt: skip
        else:
            interior = mid
        if not DOCUMENTS:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_src, DO_src, LSE_row, DELTA_row, stride_qt, stride_qd, stride_dot, stride_dod,
                seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, cols, interior, T_Q, STARTS,
                HEAD_DIM, BLOCK_M, False, True, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
            )  # fmt: skip
        dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
        DK_head = DK + b * stride_dkb + h * stride_dkh
        DV_head = DV + b * stride_dvb + h * stride_dvh
        _store_rows(DK_head, start_n, cols, stride_dkt, stride_dkd, T_K, dk, BLOCK_N, HEAD_DIM, TMA)
        _store_rows(DV_head, start_n, cols, stride_dvt, stride_dvd, T_K, dv, BLOCK_N, HEAD_DIM, TMA)
    else:  # this program's BLOCK_M queries: dQ, looping over the keys they see
        start_m = block * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        q, do, K_src, V_src = _operands(Q, DO, K, V, b, h, start_m, rows, T_Q, T_K, qk_scale, stride_qb, stride_qh,
            stride_qt, stride_qd, stride_dob, stride_doh, stride_dot, stride_dod, stride_kb, stride_kh, stride_kt,
            stride_vb, stride_vh, stride_vt, BLOCK_M, BLOCK_N, HEAD_DIM, PRESCALED, UPCAST, TMA)  # fmt: skip
        lse = tl.load(LSE + bh.to(tl.int64) * T_Q + rows, mask=rows < T_Q, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * T_Q + rows, mask=rows < T_Q, other=0.0)
        rng_base, rng_row = _rng_counters(bh, T_Q, T_K, PHILOX_32)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        mid, hi = _key_range(start_m, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
        if DOCUMENTS:  # keys [lo, full), from the earliest document start to the latest: masked
            starts_q, lo, full = _document_keys(STARTS + b * T_Q, rows, T_Q, mid, BLOCK_N)
            gap, masked_hi = mid - full, hi - (mid - full)
        else:
            starts_q, lo, full, gap, masked_hi = 0, mid, 0, 0, hi
        # keys every query of the block sees: no mask; then the causal diagonal and the ragged end
        # (with DOCUMENTS first [lo, full), then a jump to mid): masked
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
            seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, full, mid, starts_q, 0, 0,
            HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
        )  # fmt: skip
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
            seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, dropout_scale, rows, lo, masked_hi, starts_q,
            full, gap, HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT, UPCAST, PRESCALED, TMA, DOCUMENTS,
        )  # fmt: skip
        dq = dq * sm_scale
        DQ_head = DQ + b * stride_dqb + h * stride_dqh
        _store_rows(DQ_head, start_m, rows, stride_dqt, stride_dqd, T_Q, dq, BLOCK_M, HEAD_DIM, TMA)


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, dropout_p: float, scale: float, seed: int, starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns ``(dq, dk, dv)``, recomputing the probabilities from the forward's ``lse``.
    ``starts``: packed documents, as for the forward."""
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    delta = new_output(lse.shape, lse.dtype, lse.device)
    dq, dk, dv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    args = (
        q, k, v, do, lse, delta, dq, dk, dv, starts, None if starts is None else document_ends(starts), seed,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        H, T_q, T_k, triton.next_power_of_2(B * H), triton.next_power_of_2(T_q), triton.next_power_of_2(T_k),
        scale, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
    )  # fmt: skip
    docs = starts is not None
    flags = dict(
        HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, PHILOX_32=philox_32bit(B * H, T_q, T_k)
    )
    flags["DOCUMENTS"] = docs
    tensors = (q, k, v, do, dq, dk, dv)
    dkdv, dkdv_meta = attention_kernel("bwd_dkdv", _attn_bwd_kernel, q, dropout_p > 0.0, tensors, docs)
    dq_kernel, dq_meta = attention_kernel("bwd_dq", _attn_bwd_kernel, q, dropout_p > 0.0, tensors, docs)
    set_descriptor_allocator(q)
    with device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(T_q, PREPROCESS_BLOCK_M), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, T_q, HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M,
        )  # fmt: skip
        dkdv[lambda m: launch_grid(triton.cdiv(T_k, m["BLOCK_N"]), B * H, m["LONGEST_FIRST"])](
            *args, **flags, KEY_BLOCKS=True, **dkdv_meta
        )
        dq_kernel[lambda m: launch_grid(triton.cdiv(T_q, m["BLOCK_M"]), B * H, m["LONGEST_FIRST"])](
            *args, **flags, KEY_BLOCKS=False, **dq_meta
        )
    return dq, dk, dv


def document_ends(starts: torch.Tensor) -> torch.Tensor:
    """int32 (B, T): for every position, where its document ends (exclusive), from the
    document starts: the next position that starts a document, or T."""
    batch, seq_len = starts.shape
    pos = torch.arange(seq_len, device=starts.device, dtype=torch.int32)
    first = torch.where(starts == pos, pos, seq_len).to(torch.int32)  # document heads, T elsewhere
    after = torch.cat([first[:, 1:], first.new_full((batch, 1), seq_len)], dim=1)
    return torch.cummin(after.flip(1), 1).values.flip(1).contiguous()
