"""What every Triton kernel module here needs around its kernels: whether Triton's interpreter
runs them, how outputs are allocated (NaN-poisoned for parity tests), which CUDA device a
launch goes to, and tensors laid out as the kernels read them."""

from __future__ import annotations

import contextlib
import os

import torch

# TRITON_INTERPRET=1 (set before triton is imported) runs every kernel on CPU tensors through
# NumPy: the backends then accept CPU tensors, and bf16 tiles must be upcast before arithmetic.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Parity checks set this to fill every buffer the launchers allocate with NaN first, so an
# element a kernel forgot to write fails the comparison instead of passing as whatever memory held.
POISON_OUTPUTS = False


def off_gpu_refusal(t: torch.Tensor, cpu_backend: str) -> str | None:
    """Why a Triton backend cannot run on ``t``'s device, or None: it needs CUDA, or the
    interpreter on the CPU."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
        return None
    return (
        f"triton needs CUDA tensors, got {t.device.type} tensors; on the CPU use backend '{cpu_backend}' "
        "(or set TRITON_INTERPRET=1 before importing triton, for slow testing)"
    )


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous buffer that a kernel fills completely (NaN first under ``POISON_OUTPUTS``)."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s device the current one: Triton launches on the current CUDA device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View t as (rows, N) with a unit column stride; copies only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def set_descriptor_allocator(t: torch.Tensor) -> None:
    """Give Triton the allocator that kernels creating tensor descriptors (TMA) on the device
    need: each program writes its descriptors to a small global scratch buffer. Triton keeps
    the allocator in a context variable, so it is set per thread (autograd runs the backward
    on a thread of its own) and only where none is set, leaving a caller's own in place."""
    if not t.is_cuda:
        return  # the interpreter keeps descriptors on the host
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch_allocator)


def _scratch_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None
