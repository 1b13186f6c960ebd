"""The ``triton`` linear_cross_entropy backend: the loss of a language model's output layer
without the (N, V) logits, forward and backward in one pass over chunks of rows.

Design (Liger-Kernel's FusedLinearCrossEntropy, in our own words):

1. Rows go a chunk at a time, the chunk sized so its logits take about as much memory as
   ``hidden`` does (at least 1 row). For each chunk the logits come from one tensor-core matmul
   in the input dtype (fp32 accumulation inside the matmul), ``h_chunk @ W^T``.
2. One Triton kernel (linear_cross_entropy_kernels.py) reduces each row with an online
   log-sum-exp over vocabulary tiles, in fp32, and writes the loss's gradient with respect
   to the logits over them in place.
3. Two more matmuls turn that into the chunk's gradients: ``dh_chunk = dlogits @ W`` and
   ``dW += dlogits^T @ h_chunk``, the latter summed over chunks in an fp32 buffer. No atomics:
   the result is deterministic.

The gradients are therefore formed in the forward (the loss is a scalar: the backward only
scales them by its incoming gradient), the chunk loop and the autograd glue are shared with
the pure-PyTorch ``chunked`` backend (gptforge/kernels/chunked_cross_entropy.py), and the whole
is one ``torch.library.custom_op`` with a fake implementation and an autograd formula, so
torch.compile traces it as one node without graph breaks.

Peak memory beyond the inputs: one chunk of logits, dhidden (N, C) and dW (V, C) in fp32.
"""

from __future__ import annotations

import torch

from gptforge.kernels.chunked_cross_entropy import call_loss_op, chunked_loss, register_loss_autograd
from gptforge.kernels.triton.common import off_gpu_refusal
from gptforge.kernels.triton.linear_cross_entropy_kernels import cross_entropy_rows

# Logits per chunk relative to hidden's elements: Liger's rule, chunk rows ~ N / ceil(V / C).
# At GPT-2 shape (V = 50257, C = 768) and N = 16 * 1024 rows: 256-row chunks of 26 MB in bf16,
# against 1.6 GB of logits.
MIN_CHUNK_ROWS = 1  # tests raise it to cover several chunks with few rows


def _chunk_rows(n_rows: int, vocab: int, n_embd: int) -> int:
    chunks = -(-vocab // n_embd)
    rows = -(-n_rows // chunks)
    return max(MIN_CHUNK_ROWS, 1 << (rows - 1).bit_length())  # a power of two: few distinct matmul shapes


@torch.library.custom_op("gpt_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool,
    need_dhidden: bool, need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dhidden or empty, dloss/dweight in fp32 or empty)."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    targets = targets.to(torch.int64).contiguous()
    return chunked_loss(
        hidden, weight.contiguous(), targets, ignore_index, mean, need_dhidden, need_dweight,
        step=cross_entropy_rows, logits_dtype=hidden.dtype,
        rows=_chunk_rows(hidden.shape[0], weight.shape[0], hidden.shape[1]),
    )  # fmt: skip


register_loss_autograd(linear_cross_entropy_fwd)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """The backend function (gptforge/kernels/dispatch.py); inputs validated by kernels/__init__.py."""
    return call_loss_op(linear_cross_entropy_fwd, hidden, weight, targets, ignore_index, reduction)


def unsupported(fn: str, *tensors: torch.Tensor | None, **kwargs) -> str | None:
    """None when this backend can run the call, else one sentence saying why not."""
    return off_gpu_refusal(tensors[0], "chunked")
