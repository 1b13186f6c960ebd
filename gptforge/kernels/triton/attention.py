"""The ``triton`` attention backend: fused attention in the FlashAttention-2 style.

Forward: each program owns BLOCK_M queries of one (batch, head) and streams over the keys in
BLOCK_N tiles, keeping a running max ``m``, a running normaliser ``l`` and an fp32 output
accumulator (the "online softmax"). Scores never leave registers, so memory is O(T), not O(T^2).
It saves the log-sum-exp of every query row for the backward.

Backward: ``delta = rowsum(dO * O)`` first (a small preprocess kernel), then one kernel
launched twice, recomputing the probabilities ``P = exp2(S - lse)`` tile by tile from the
saved log-sum-exp: once owning blocks of keys and looping over queries (dK, dV), once owning
blocks of queries and looping over keys (dQ). No (Tq, Tk) matrix is ever stored and no
atomics are needed.

The code reads in that order: attention_forward.py (tile helpers, the forward kernel and its
launcher), attention_backward.py (the backward kernels and their launcher), then this file:
the custom ops torch.compile sees, and the backend functions gptforge/kernels/dispatch.py calls.
Launch configurations (autotune candidates) are in configs.py.

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
* Packed documents (``cu_seqlens``) reach the kernels as ``starts``, each position's document
  start within its row (documents.document_starts); query i sees key j iff
  ``starts[i] <= j <= i``. Dropout counters stay those of the (batch*head, query, key)
  position, so a row holding one document draws exactly the unpacked kernel's mask.
* ``UPCAST`` is True only under Triton's interpreter, whose bf16 arithmetic is wrong (NumPy has
  no bfloat16): tiles are converted to fp32 right after loading. On a GPU it is False and the
  ``tl.dot`` operands stay bf16/fp16 for the tensor cores.
"""

from __future__ import annotations

import torch

from gptforge.kernels.documents import document_starts
from gptforge.kernels.triton.attention_backward import backward
from gptforge.kernels.triton.attention_forward import forward
from gptforge.kernels.triton.common import INTERPRET
from gptforge.kernels.triton.configs import HEAD_DIMS

# --------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------
# The kernels are opaque to torch.compile: it sees two ops with fake (shape-only) versions.
# The dropout seed travels as a CPU tensor drawn from torch's generator, so the graph has no
# data-dependent Python int in it and torch.manual_seed makes dropout reproducible.


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op(
    "gpt_kernels::flash_attention_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool causal, float dropout_p, float scale, Tensor? seed,"
    " Tensor? starts=None) -> (Tensor, Tensor)",
)
def flash_attention_fwd(q, k, v, causal, dropout_p, scale, seed, starts=None):
    """Returns ``(out, lse)``; ``lse`` (fp32, (B, H, Tq), base 2) is kept for the backward.
    ``starts``: packed documents' int32 (B, T) document starts, or None."""
    return forward(q, k, v, causal, dropout_p, scale, _seed_value(seed), starts)


@flash_attention_fwd.register_fake
def _(q, k, v, causal, dropout_p, scale, seed, starts=None):
    B, H, T_q, D = q.shape
    return q.new_empty((B, H, T_q, D)), q.new_empty((B, H, T_q), dtype=torch.float32)


@torch.library.custom_op(
    "gpt_kernels::flash_attention_bwd",
    mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float dropout_p,"
    " float scale, Tensor? seed, Tensor? starts=None) -> (Tensor, Tensor, Tensor)",
)
def flash_attention_bwd(do, q, k, v, o, lse, causal, dropout_p, scale, seed, starts=None):
    """Returns ``(dq, dk, dv)``, recomputing the probabilities from ``lse``."""
    return backward(do, q, k, v, o, lse, causal, dropout_p, scale, _seed_value(seed), starts)


@flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, scale, seed, starts=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, scale, seed, starts = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed, starts)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, seed, starts = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_bwd(
        do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, ctx.scale, seed, starts
    )
    return dq, dk, dv, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Backend interface (inputs are validated by kernels.attention)
# --------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Fused attention over (B, H, T, D) tensors; see ``kernels.attention`` for the contract."""
    # the Philox seed comes from torch's (CPU) generator: torch.manual_seed makes dropout repeatable
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    starts = None if cu_seqlens is None else document_starts(cu_seqlens, q.shape[0], q.shape[-2]).contiguous()
    out, _ = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, causal, dropout_p, scale, seed, starts)
    return out


def unsupported(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> str | None:
    """None when the triton backend can run this call, else why not and what to use instead."""
    if fn != "attention":
        return f"the triton attention module has no function {fn!r}"
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
