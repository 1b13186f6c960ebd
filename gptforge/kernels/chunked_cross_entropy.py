"""The ``chunked`` linear_cross_entropy backend: plain PyTorch that never holds all the logits.

    loss = sum over rows r not ignored of  logsumexp(h_r W^T) - (h_r W^T)[target_r],  / count

The rows are taken a chunk at a time. For each chunk the fp32 logits are formed, reduced to
the loss, and turned in place into their gradient ``(softmax - onehot) * scale``, which is
multiplied straight away into the gradients of hidden (``dlogits @ W``) and of the weight
(``dW += dlogits^T @ h``, accumulated in fp32). So the gradients are computed in the forward
pass, as Liger-Kernel's FusedLinearCrossEntropy does, and the backward only scales them by the
incoming gradient: peak memory is one chunk of logits plus the two gradients, never (N, V).
The loss is a scalar, so nothing is lost by doing the backward's work early; without grad
mode (evaluation) the gradient work is skipped.

The op is a ``torch.library.custom_op`` so that torch.compile sees one opaque node rather
than unrolling the chunk loop. The Triton backend (triton/linear_cross_entropy.py) shares the
chunk loop and the autograd glue below, replacing the per-chunk softmax step by one kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptforge.kernels.reference import no_autocast

# Bytes of fp32 logits per chunk. Every chunk reads and writes the whole fp32 dW (V x C), so
# chunks must be large: at 4 MiB (20 rows of GPT-2's vocabulary) that traffic made the loss
# 2x slower than the materialised one on the CPU; at 64 MiB (~330 rows) it is ~25 passes.
CHUNK_BYTES = 64 * 2**20

# Parity tests set this: dhidden then starts as NaN, so a row the chunk loop missed fails.
POISON_OUTPUTS = False

# (logits chunk (rows, V), targets (rows,), ignore_index, valid (rows,), scale (fp32 scalar
# tensor), need_grad) -> the chunk's summed loss (fp32 scalar); with need_grad, logits now hold dlogits.
ChunkStep = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def chunk_rows(n_rows: int, vocab: int, element_size: int = 4) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES of logits, at least one."""
    return max(1, min(n_rows, CHUNK_BYTES // (element_size * vocab)))


def auto_passes(fn: str, hidden: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> bool:
    """``auto`` takes the materialised loss (the ``torch`` backend) where all the fp32 logits fit
    in one chunk: chunking then saves no memory, and F.cross_entropy's fused passes beat the
    chunk step's (kernels/dispatch.py). Loss + backward, V=65, 2 CPU cores: 1.16x faster at
    N=4096, C=128 and 1.27x at N=2048, C=384 in fp32; 1.3x and 1.25x under bf16 autocast."""
    return hidden.shape[0] <= chunk_rows(hidden.shape[0], weight.shape[0])


def torch_step(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, valid: torch.Tensor, scale: torch.Tensor,
    need_grad: bool,
) -> torch.Tensor:
    """One chunk's loss from its fp32 logits, and (need_grad) its dlogits in place, in few passes."""
    safe = torch.where(valid, targets, 0).long()[:, None]
    target_logit = logits.gather(1, safe).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()  # in place: the logits are not needed again
    total = exp.sum(dim=1, keepdim=True)
    lse = (row_max + total.log()).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    if need_grad:
        # softmax - onehot, times scale on valid rows and 0 on ignored ones
        row_scale = torch.where(valid, scale, 0.0)[:, None]
        exp.mul_(row_scale / total)
        exp.scatter_add_(1, safe, -row_scale)
    return loss


def chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool,
    need_dhidden: bool, need_dweight: bool,
    step: ChunkStep = torch_step,
    logits_dtype: torch.dtype = torch.float32,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dhidden or an empty tensor, dloss/dweight in fp32 or an empty tensor).

    ``logits_dtype`` is the dtype the chunk's logits (and matmuls) use: fp32 here; the Triton
    backend keeps the input dtype for the tensor cores and reduces in fp32 inside its kernel.
    ``rows`` per chunk defaults to ``chunk_rows``.
    """
    n_rows, n_embd = hidden.shape
    vocab = weight.shape[0]
    w = weight.to(logits_dtype)  # no copy when the dtypes agree
    valid = targets != ignore_index
    count = valid.sum().clamp(min=1).to(torch.float32)
    scale = 1.0 / count if mean else torch.ones((), dtype=torch.float32, device=hidden.device)
    need_grad = need_dhidden or need_dweight
    dhidden = hidden.new_empty((n_rows, n_embd) if need_dhidden else (0,))
    if POISON_OUTPUTS:
        dhidden.fill_(float("nan"))
    dweight = hidden.new_zeros((vocab, n_embd) if need_dweight else (0,), dtype=torch.float32)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = rows or chunk_rows(n_rows, vocab, torch.finfo(logits_dtype).bits // 8)
    with no_autocast(hidden.device.type):  # the caller cast for autocast already; keep fp32 sums fp32
        _chunk_loop(hidden, w, targets, ignore_index, valid, scale, dhidden, dweight, loss, rows, step, need_grad)
    return loss * scale if mean else loss, dhidden, dweight


def _chunk_loop(hidden, w, targets, ignore_index, valid, scale, dhidden, dweight, loss, rows, step, need_grad):
    n_rows, need_dhidden, need_dweight = hidden.shape[0], dhidden.numel() > 0, dweight.numel() > 0
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h = hidden[start:end].to(w.dtype)
        logits = h @ w.t()  # (rows, V)
        loss += step(logits, targets[start:end], ignore_index, valid[start:end], scale, need_grad)
        if need_dhidden:
            if dhidden.dtype == logits.dtype:
                torch.mm(logits, w, out=dhidden[start:end])
            else:
                dhidden[start:end].copy_(logits @ w)
        if need_dweight:
            if logits.dtype == torch.float32:
                dweight.addmm_(logits.t(), h)
            else:
                dweight.add_(logits.t() @ h)  # the chunk's product in the input dtype, summed in fp32


@torch.library.custom_op("gpt_kernels::chunked_linear_cross_entropy", mutates_args=())
def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool,
    need_dhidden: bool, need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight): see ``chunked_loss``."""
    return chunked_loss(hidden, weight, targets, ignore_index, mean, need_dhidden, need_dweight)


def fake_loss_outputs(hidden, weight, targets, ignore_index, mean, need_dhidden, need_dweight):
    """Shapes and dtypes of a (loss, dhidden, dweight) op's outputs, for torch.compile."""
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape if need_dhidden else (0,)),
        hidden.new_empty(weight.shape if need_dweight else (0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    _, dhidden, dweight = output
    # dhidden and dweight never receive a gradient: without this, autograd would fill zeros of
    # their shapes for _backward to ignore (a pass over (N, C) per step)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dhidden, dweight)
    ctx.weight_dtype = inputs[1].dtype
    ctx.need = (inputs[5], inputs[6])


def _backward(ctx, dloss, _ddhidden, _ddweight):
    """The gradients were formed in the forward; the chain rule only scales them by dloss."""
    dhidden, dweight = ctx.saved_tensors
    need_dhidden, need_dweight = ctx.need
    grad_hidden = dhidden * dloss.to(dhidden.dtype) if need_dhidden and ctx.needs_input_grad[0] else None
    grad_weight = (dweight * dloss).to(ctx.weight_dtype) if need_dweight and ctx.needs_input_grad[1] else None
    return grad_hidden, grad_weight, None, None, None, None, None


def register_loss_autograd(op) -> None:
    """Give a (loss, dhidden, dweight) custom op its fake implementation and autograd formula."""
    op.register_fake(fake_loss_outputs)
    op.register_autograd(_backward, setup_context=_setup_context)


register_loss_autograd(chunked_linear_cross_entropy)


def call_loss_op(
    op, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """Run a (loss, dhidden, dweight) op, asking for the gradients autograd will want."""
    grad = torch.is_grad_enabled()
    loss, _, _ = op(
        hidden, weight, targets, ignore_index, reduction == "mean", grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )  # fmt: skip
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """The backend function (gptforge/kernels/dispatch.py); inputs validated by kernels/__init__.py."""
    return call_loss_op(chunked_linear_cross_entropy, hidden, weight, targets, ignore_index, reduction)
