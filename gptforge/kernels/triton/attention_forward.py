"""Fused attention, forward pass (FlashAttention-2 style); the overview is in attention.py.

Each program owns BLOCK_M queries of one (batch, head) and streams over the keys in BLOCK_N
tiles, keeping a running max ``m``, a running normaliser ``l`` and an fp32 output accumulator
(the "online softmax"). Key tiles every query of the block sees in full run unmasked; only
the tiles on the causal diagonal and the ragged last tile pay for a mask. The tile helpers at
the top are shared with the backward kernels (attention_backward.py).

Two switches (constexprs the autotuner chooses between, configs.py) change how, not what:
``LONGEST_FIRST`` launches the causal query blocks that see the most keys first, and ``TMA``
moves tiles with Hopper's tensor-memory accelerator (tensor descriptors) instead of pointers.

``DOCUMENTS`` (set by the launcher, not tuned) packs several documents in a row: ``STARTS``
(int32 (B, T)) holds where each position's document begins, and query i sees key j iff
``starts[i] <= j <= i``. A query block's key loop then starts at the tile holding the block's
earliest document start; the tiles before its latest start pay for the document mask. They
run in the masked loop, which jumps from them to the diagonal: two loops, as without
documents (a third loop cost up to 70 more registers and spilled at D = 128; python -m
gptforge.kernels.aot). Off, STARTS is None and the kernel compiles exactly as without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptforge.kernels.triton.common import INTERPRET, device_guard, new_output, set_descriptor_allocator
from gptforge.kernels.triton.configs import attention_kernel, philox_32bit

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Tile helpers (forward and backward)
# --------------------------------------------------------------------------------------------


@triton.jit
def _program_block(H, LONGEST_FIRST: tl.constexpr, REVERSE: tl.constexpr):
    """(block index along T, bh, batch, head) of this program.

    Grids are (blocks along T, batch * heads); with LONGEST_FIRST they are (batch * heads,
    blocks), so the block index is the slow axis and the GPU starts every head's first block
    before any head's second. With REVERSE the first block is the last one along T: for causal
    attention the query blocks that see the most keys, so the longest programs do not start
    last and leave the tail of the launch to a few SMs."""
    if LONGEST_FIRST:
        bh = tl.program_id(0)
        block = tl.program_id(1)
        if REVERSE:
            block = tl.num_programs(1) - 1 - block
    else:
        block = tl.program_id(0)
        bh = tl.program_id(1)
    return block, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


def launch_grid(blocks: int, heads: int, longest_first: bool) -> tuple[int, int]:
    """The grid ``_program_block`` expects for ``blocks`` blocks along T and ``heads`` = B * H."""
    return (heads, blocks) if longest_first else (blocks, heads)


@triton.jit
def _rows_ptrs(head, rows, stride_t, stride_d, T, HEAD_DIM: tl.constexpr):
    """Pointers to rows ``rows`` of one head's (T, HEAD_DIM) matrix, and the mask of those before T."""
    offs_d = tl.arange(0, HEAD_DIM)
    return head + rows[:, None] * stride_t + offs_d[None, :] * stride_d, rows[:, None] < T


@triton.jit
def _rows_desc(head, T, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A tensor descriptor (TMA) over one head's (T, HEAD_DIM) matrix, in tiles of BLOCK rows.
    Rows past T load as 0 and are not stored: the copy engine clips at the shape, so no mask."""
    return tl.make_tensor_descriptor(head, shape=[T, HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _load_two(a_ptrs, b_ptrs, inside, UPCAST: tl.constexpr):
    """Load two tiles of the same rows, both issued before either is used (as the compiler's
    pipeliner expects); rows outside read as 0; with UPCAST, as fp32."""
    a = tl.load(a_ptrs, mask=inside, other=0.0)
    b = tl.load(b_ptrs, mask=inside, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _store_rows(
    head, start, rows, stride_t, stride_d, T, tile, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr
):
    """Store a (BLOCK, HEAD_DIM) fp32 tile as rows ``rows`` (from ``start``) of one head's
    (T, HEAD_DIM) matrix, in its dtype, the rows before T only: through a tensor descriptor
    with TMA, else by pointers."""
    if TMA:
        _rows_desc(head, T, stride_t, BLOCK, HEAD_DIM).store([start, 0], tile.to(head.dtype.element_ty))
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        ptrs = head + rows[:, None] * stride_t + offs_d[None, :] * stride_d
        tl.store(ptrs, tile.to(head.dtype.element_ty), mask=rows[:, None] < T)


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
def _document_keys(STARTS_row, offs_m, T_Q, mid, BLOCK_N: tl.constexpr):
    """Packed documents, for a query block (rows ``offs_m``) whose causal range needs no mask
    from ``mid``: (each row's document start, the first key tile any row sees, the first tile
    from which every row sees every key up to ``mid``). Keys in [lo, full) need the document mask."""
    starts = tl.load(STARTS_row + offs_m, mask=offs_m < T_Q, other=0)
    first = tl.min(tl.where(offs_m < T_Q, starts, T_Q), 0)
    lo = (first // BLOCK_N) * BLOCK_N
    full = tl.cdiv(tl.max(starts, 0), BLOCK_N) * BLOCK_N
    return starts, lo, tl.minimum(tl.maximum(full, lo), mid)


@triton.jit
def _rng_counters(bh, T_Q, T_K, PHILOX_32: tl.constexpr):
    """(first counter, counters per query row) of head ``bh``'s dropout: one Philox counter per
    (bh, query, key), ``first + row * per_row + key``. In int32 when every counter fits
    (PHILOX_32), else in int64 throughout. ``tl.rand`` draws the same numbers either way
    (Philox4x32; a 64-bit counter adds its high word, 0 below 2^32): the switch saves the
    per-element 64-bit index arithmetic and the high word's extraction."""
    if PHILOX_32:
        return bh * T_Q * T_K, T_K
    else:
        per_row = tl.cast(T_K, tl.int64)
        return bh.to(tl.int64) * T_Q * per_row, per_row


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
    seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, offs_m, lo, hi, starts_q, gap_at, gap,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, DOCUMENTS: tl.constexpr,
):  # fmt: skip
    """Fold the key tiles ``[lo, hi)`` into the running (acc, l, m) of one query block.
    ``K_src``/``V_src`` are the head's tensor descriptors with TMA, else pointers to its rows.
    With DOCUMENTS the mask also hides keys before each row's document start ``starts_q``,
    and the masked loop skips ``gap`` keys from ``gap_at`` (the tiles the unmasked loop ran)."""
    # The loop body spells out its pointers, loads and mask rather than calling the tile helpers:
    # Triton inlines either way, but the interpreter pays about a millisecond per nested call.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        if DOCUMENTS and MASKED:
            start_n = tl.where(start_n >= gap_at, start_n + gap, start_n)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if TMA:  # keys past T_K come back as 0 from the copy engine: no load mask
            kt = tl.trans(K_src.load([start_n, 0]))
            v = V_src.load([start_n, 0])
        else:
            kt_ptrs = K_src + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd  # K^T: (D, BLOCK_N)
            v_ptrs = V_src + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
            kt = tl.load(kt_ptrs, mask=cols[None, :] < T_K, other=0.0) if MASKED else tl.load(kt_ptrs)
            v = tl.load(v_ptrs, mask=cols[:, None] < T_K, other=0.0) if MASKED else tl.load(v_ptrs)
        if UPCAST:
            kt, v = kt.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base 2
        if MASKED:
            visible = cols[None, :] < T_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (T_K - T_Q))
            if DOCUMENTS:
                visible = visible & (cols[None, :] >= starts_q[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row that has seen no key yet keeps m = -inf: subtract 0, not -inf (inf - inf = NaN)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # the normaliser above counts every p; only the output sees the dropped ones
            rng_offs = rng_base + offs_m[:, None] * rng_row + cols[None, :]
            p = tl.where(tl.rand(seed, rng_offs) >= dropout_p, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, STARTS, seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, T_K, BH_KEY, T_Q_KEY, T_K_KEY, qk_scale, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PHILOX_32: tl.constexpr,
    LONGEST_FIRST: tl.constexpr, TMA: tl.constexpr, DOCUMENTS: tl.constexpr,
):  # fmt: skip
    # BH_KEY, T_Q_KEY and T_K_KEY are power-of-two buckets of B * H, T_Q and T_K, read only by
    # the autotuner's key.
    block, bh, b, h = _program_block(H, LONGEST_FIRST, True)  # later query blocks see more keys
    start_m = block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    Q_head = Q + b * stride_qb + h * stride_qh
    if TMA:
        q = _rows_desc(Q_head, T_Q, stride_qt, BLOCK_M, HEAD_DIM).load([start_m, 0])
        K_src = _rows_desc(K + b * stride_kb + h * stride_kh, T_K, stride_kt, BLOCK_N, HEAD_DIM)
        V_src = _rows_desc(V + b * stride_vb + h * stride_vh, T_K, stride_vt, BLOCK_N, HEAD_DIM)
    else:
        q_ptrs, q_inside = _rows_ptrs(Q_head, offs_m, stride_qt, stride_qd, T_Q, HEAD_DIM)
        q = tl.load(q_ptrs, mask=q_inside, other=0.0)
        K_src = K + b * stride_kb + h * stride_kh
        V_src = V + b * stride_vb + h * stride_vh
    if UPCAST:
        q = q.to(tl.float32)
    rng_base, rng_row = _rng_counters(bh, T_Q, T_K, PHILOX_32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    mid, hi = _key_range(start_m, T_Q, T_K, BLOCK_M, BLOCK_N, CAUSAL)
    if DOCUMENTS:  # keys [lo, full), from the earliest document start to the latest, take the mask
        starts_q, lo, full = _document_keys(STARTS + b * T_Q, offs_m, T_Q, mid, BLOCK_N)
        gap, masked_hi = mid - full, hi - (mid - full)
    else:
        starts_q, lo, full, gap, masked_hi = 0, mid, 0, 0, hi
    # stage 1: tiles that every query of the block sees in full -- no mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
        seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, offs_m, full, mid, starts_q, 0, 0,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT, UPCAST, TMA, DOCUMENTS,
    )  # fmt: skip
    # stage 2: the tiles on the causal diagonal and the ragged last tile (with DOCUMENTS first
    # [lo, full), then a jump to mid) -- masked
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kt, stride_kd, stride_vt, stride_vd,
        seed, rng_base, rng_row, T_Q, T_K, qk_scale, dropout_p, offs_m, lo, masked_hi, starts_q, full, gap,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT, UPCAST, TMA, DOCUMENTS,
    )  # fmt: skip

    seen = l_i > 0.0  # False only for rows that see no key at all: they output 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * T_Q + offs_m, lse, mask=offs_m < T_Q)
    O_head = Out + b * stride_ob + h * stride_oh
    _store_rows(O_head, start_m, offs_m, stride_ot, stride_od, T_Q, out, BLOCK_M, HEAD_DIM, TMA)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float, seed: int,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns ``(out, lse)``: out like q, lse fp32 (B, H, Tq) in base 2, for the backward.
    ``starts``: packed documents, int32 (B, T) document starts (``documents.document_starts``)."""
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    o = new_output((B, H, T_q, D), q.dtype, q.device)
    lse = new_output((B, H, T_q), torch.float32, q.device)
    documents = starts is not None
    kernel, meta = attention_kernel("fwd", _attn_fwd_kernel, q, dropout_p > 0.0, (q, k, v, o), documents)
    set_descriptor_allocator(q)

    def grid(m: dict) -> tuple[int, int]:
        return launch_grid(triton.cdiv(T_q, m["BLOCK_M"]), B * H, m["LONGEST_FIRST"])

    with device_guard(q):
        kernel[grid](
            q, k, v, o, lse, starts, seed, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T_q, T_k, triton.next_power_of_2(B * H), triton.next_power_of_2(T_q), triton.next_power_of_2(T_k),
            scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
            HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET,
            PHILOX_32=philox_32bit(B * H, T_q, T_k), DOCUMENTS=documents, **meta,
        )  # fmt: skip
    return o, lse
