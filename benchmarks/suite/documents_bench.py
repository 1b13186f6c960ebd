"""Part of stage c: packed documents against padding, through our attention kernels.

Rows of T tokens (2048 and 8192 on a GPU, 16k tokens per call, H = 2048 / D at D = 64) are
filled with documents whose lengths follow a long tail (log-normal, median 300 tokens, the
last document of a row cut to fit), as a pre-training or SFT batch is packed. The contenders:

- ``triton packed``: the rows as they are, with ``cu_seqlens`` (each document sees itself only);
- ``triton padded``: each document in a row of its own, padded to the longest document, through
  the plain causal kernel (what a batch without a document mask has to do to stay exact);
- ``sdpa-flash padded``: the same padded rows through SDPA's FlashAttention-2 backend.

Throughput counts real tokens only (padding is waste): tokens/s, and the useful causal
attention work per second (4·H·L²·D / 2 per document of length L; 2.5 times more with the
backward), so the figures compare the kernels on the work a packed batch asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.suite.stage import Stage
from gptforge import kernels

MEDIAN_LENGTH, SIGMA = 300, 1.0  # log-normal document lengths, in tokens
ROUNDS = 5


def document_lengths(rows: int, seq_len: int, median: float, seed: int = 0) -> list[list[int]]:
    """Per row, the lengths of the documents that fill it (each at least 1, summing to T)."""
    g = torch.Generator().manual_seed(seed)
    filled = []
    for _ in range(rows):
        lengths, left = [], seq_len
        while left > 0:
            draw = float(torch.empty(1).log_normal_(float(torch.tensor(median).log()), SIGMA, generator=g))
            lengths.append(min(left, max(1, round(draw))))
            left -= lengths[-1]
        filled.append(lengths)
    return filled


def run_packed_attention(stage: Stage, warm: Callable[[Stage, str, dict], dict]) -> None:
    """Time packed against padded attention at each row length, forward and forward + backward.
    ``warm``: the stage's warm-up (kernel_bench._warm), which notes a contender that cannot run."""
    if stage.cuda:
        shapes, median = [(16384 // T, 32, T, 64) for T in (2048, 8192)], MEDIAN_LENGTH
    else:  # the rehearsal: toy sizes through the interpreter
        shapes, median = [(1, 1, 40, 16)], 8
    for i, (B, H, T, D) in enumerate(shapes):
        if stage.left() < 20:
            stage.note("packed attention", "not reached", f"{len(shapes) - i} of {len(shapes)} shapes: out of time")
            return
        lengths = document_lengths(B, T, median, seed=T)
        for mode in ("fwd", "fwd+bwd"):
            time_packed(stage, warm, B, H, T, D, lengths, mode)


def time_packed(stage: Stage, warm: Callable, B: int, H: int, T: int, D: int, lengths: list[list[int]],
                mode: str) -> None:  # fmt: skip
    """The three contenders on the same documents (the padded rows hold the packed rows' data)."""
    flat = [n for row in lengths for n in row]
    longest, dev, dtype = max(flat), stage.device, torch.bfloat16
    shape = f"B{B} H{H} T{T} D{D}, {len(flat)} documents, longest {longest}"
    group = f"packed attention {mode}, causal, bf16, {shape}"
    grad = mode == "fwd+bwd"
    packed = [torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=grad) for _ in range(3)]
    padded = [torch.zeros(len(flat), H, longest, D, device=dev, dtype=dtype) for _ in range(3)]
    for src, dst in zip(packed, padded, strict=True):
        docs = torch.cat([src.detach()[b].transpose(0, 1) for b in range(B)]).split(flat)  # (L, H, D) each
        for j, doc in enumerate(docs):
            dst[j, :, : doc.shape[0]] = doc.transpose(0, 1)
        dst.requires_grad_(grad)
    offsets = torch.tensor([0, *flat], device=dev).cumsum(0).to(torch.int32)
    cotangents = [torch.randn_like(packed[0]), torch.randn_like(padded[0])]

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    contenders = {
        "triton packed": (lambda q, k, v: kernels.attention(q, k, v, backend="triton", cu_seqlens=offsets), 0),
        "triton padded": (lambda q, k, v: kernels.attention(q, k, v, backend="triton"), 1),
        "sdpa-flash padded": (sdpa_flash, 1),
    }
    fns = {}
    for name, (attn, which) in contenders.items():
        inputs = (packed, padded)[which]
        if grad:
            fns[name] = lambda a=attn, x=inputs, c=cotangents[which]: torch.autograd.grad(a(*x), x, c)
        else:
            fns[name] = lambda a=attn, x=inputs: _no_grad(a, *x)
    times = stage.interleaved(warm(stage, group, fns), stage.rounds(ROUNDS))
    useful = sum(2 * H * n * n * D for n in flat) * (3.5 if grad else 1.0)  # causal 4·H·L²·D / 2 per document
    waste = len(flat) * longest / (B * T)
    for name, (median_s, fastest, slowest) in times.items():
        note = f"{useful / median_s / 1e12:.1f} useful TFLOP/s"
        note += f"; padded rows hold {waste:.1f}x the real tokens" if "padded" in name else ""
        stage.figure(group, name, B * T / median_s, "tokens/s", shape=shape, backend=name, baseline="triton padded",
                     spread=[B * T / slowest, B * T / fastest], note=note)  # fmt: skip


def _no_grad(fn: Callable, *args):
    with torch.no_grad():
        return fn(*args)
