"""Part of stage d: the fused linear + cross-entropy against the loss that materialises the logits.

GPT-2's head on one micro-batch: N = 8192 positions (16 x 512), C = 768, V = 50,257, bf16 on a
GPU. The loss and the gradients of the hidden states and the head's weight, as training needs
them, through:

- ``triton``: ``kernels.linear_cross_entropy(backend="triton")`` (chunked matmuls, the log-sum-exp
  and the logits' gradient in one Triton kernel; never the whole (N, V) logits);
- ``chunked``: the same chunking in plain PyTorch (the CPU's default);
- ``materialised``: ``F.cross_entropy`` on ``(h @ W^T).float()``, as the model did before;
- ``materialised, compiled``: the same function through ``torch.compile``.

Each is timed in interleaved rounds (tokens/s) and its peak memory measured on its own: CUDA's
``max_memory_allocated`` during one call, above what was allocated before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.suite.stage import Stage
from gptforge import kernels

ROUNDS = 5


def materialised(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.t()).float(), y)


def run_fused_loss(stage: Stage, warm: Callable[[Stage, str, dict], dict]) -> None:
    """``warm``: the stage's warm-up (kernel_bench._warm), which notes a contender that cannot run."""
    N, C, V = (8192, 768, 50257) if stage.cuda else (16, 16, 100)  # the rehearsal: toy sizes
    dtype, dev = torch.bfloat16, stage.device
    group = f"linear + cross-entropy fwd+bwd, bf16, N{N} C{C} V{V}"
    h = torch.randn(N, C, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, C, device=dev, dtype=dtype) * C**-0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)
    contenders: dict[str, Callable] = {
        "triton": lambda: kernels.linear_cross_entropy(h, w, y, backend="triton"),
        "chunked": lambda: kernels.linear_cross_entropy(h, w, y, backend="chunked"),
        "materialised": lambda: materialised(h, w, y),
    }
    if stage.cuda:  # on the CPU a compile alone would spend the rehearsal's whole share
        compiled = torch.compile(materialised)
        contenders["materialised, compiled"] = lambda: compiled(h, w, y)
    else:
        stage.note(group, "materialised, compiled", "skipped in the rehearsal (compiling costs more than its share)")
    fns = {name: (lambda loss=loss: torch.autograd.grad(loss(), (h, w))) for name, loss in contenders.items()}
    ready = warm(stage, group, fns)
    peaks = {name: _peak_mib(stage, fn) for name, fn in ready.items()}
    times = stage.interleaved(ready, stage.rounds(ROUNDS))
    for name, (median_s, fastest, slowest) in times.items():
        note = f"peak {peaks[name]:,.0f} MiB above the inputs" if peaks[name] is not None else ""
        stage.figure(group, name, N / median_s, "tokens/s", backend=name, baseline="materialised",
                     spread=[N / slowest, N / fastest], note=note)  # fmt: skip
        if peaks[name] is not None:
            stage.figure(f"{group}, peak memory", name, peaks[name], "MiB", backend=name, baseline="materialised")


def _peak_mib(stage: Stage, fn: Callable[[], object]) -> float | None:
    """MiB that one call allocated at its peak beyond what was held before it (CUDA only)."""
    if not stage.cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
