"""The Triton kernel of the fused linear + cross-entropy, and its launcher.

The logits of a chunk of rows come from a tensor-core matmul (see linear_cross_entropy.py);
this kernel does everything else for that chunk in one launch, one program per row:

1. an online log-sum-exp over vocabulary tiles of BLOCK_V: a running max and a running sum of
   exponentials rescaled whenever the max grows, so a row of any length is read once for the
   loss, and the target's logit is picked up on the way;
2. with NEED_GRAD, a second pass over the same tiles writing the gradient of the loss with
   respect to the logits, ``(softmax - onehot(target)) * scale``, over the logits in place
   (``scale`` is 1/count for a mean, 1 for a sum, and 0 for a row at ``ignore_index``).

Every tile is converted to fp32 right after it is loaded: the arithmetic is fp32 whatever the
logits' dtype (which also sidesteps the interpreter's broken bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptforge.kernels.triton.common import device_guard

# The vocabulary tile: GPT-2's 50,257 logits are 13 tiles of 4096. Tests lower it to exercise
# the online rescaling across many tiles with a small vocabulary.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


def block_v(vocab: int) -> int:
    """The tile for a vocabulary: a power of two, at least 128, at most MAX_BLOCK_V."""
    return min(MAX_BLOCK_V, max(128, triton.next_power_of_2(vocab)))


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS,  # (rows, V) logits of the chunk, unit column stride; overwritten by dlogits (NEED_GRAD)
    TARGETS,  # (rows,) int64 class ids or ignore_index
    LOSS,  # (rows,) fp32 out: the row's loss, 0 at ignore_index
    SCALE,  # (1,) fp32: the gradient's factor for valid rows (1/count for a mean, 1 for a sum)
    stride_row,
    vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0)
    LOGITS += row.to(tl.int64) * stride_row
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online log-sum-exp; the running max starts at the first tile's (never -inf)
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        ok = start + cols < vocab
        x = tl.load(LOGITS + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
        # lane-wise running statistics: each lane rescales only when its own max grows; the
        # lanes are combined once at the end (fewer cross-lane reductions per tile)
        new_max = tl.maximum(run_max, x)
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * rescale + tl.where(ok, tl.exp(x - new_max), 0.0)
        run_max = new_max
        target_logit += tl.where(start + cols == target, x, 0.0)
    row_max = tl.max(run_max, axis=0)
    lane_sum = tl.where(run_max == float("-inf"), 0.0, run_sum * tl.exp(run_max - row_max))
    lse = row_max + tl.log(tl.sum(lane_sum, axis=0))
    valid = target != ignore_index
    tl.store(LOSS + row, tl.where(valid, lse - tl.sum(target_logit, axis=0), 0.0))

    if NEED_GRAD:
        scale = tl.where(valid, tl.load(SCALE), 0.0)
        for start in range(0, vocab, BLOCK_V):
            ok = start + cols < vocab
            x = tl.load(LOGITS + start + cols, mask=ok, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(LOGITS + start + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=ok)


def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, valid: torch.Tensor, scale: torch.Tensor,
    need_grad: bool,
) -> torch.Tensor:
    """The chunk step of chunked_cross_entropy.chunked_loss, fused: the chunk's summed loss, and
    (need_grad) dlogits written over ``logits``. ``valid`` is implied by the targets here."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    with device_guard(logits):
        _cross_entropy_rows_kernel[(rows,)](
            logits, targets, loss, scale.reshape(1), logits.stride(0), vocab, ignore_index,
            BLOCK_V=block_v(vocab), NEED_GRAD=need_grad, num_warps=NUM_WARPS, num_stages=1,
        )  # fmt: skip
    return loss.sum()
