"""Kernel benchmarks: every available backend on the same inputs, next to the card's peaks.

- Attention: TFLOP/s, counting 4*B*H*Tq*Tk*D for the forward (halved when causal) and 2.5x
  that for the backward (FlashAttention's convention), forward, backward and both.
- LayerNorm and the fused residual-add + LayerNorm: GB/s of bytes read plus written.
- Peaks measured in the same run: copy bandwidth (a large clone) and a large matmul.

Each timed call cycles through several input sets, so caches do not flatter small shapes.
Triton kernels on the CPU run in Triton's interpreter: correct, but no speed, so skipped.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.common import DEVICE, Result, attention_flops, ln_bytes, record, seconds_per_call
from gptforge import kernels

CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
INPUT_SETS = 3
ATTN_BACKENDS = ["torch", "sdpa", "flash_attn", "triton"]
LN_BACKENDS = ["torch", "triton"]

if CUDA:  # (B, H, T, D): 16k tokens per call, GPT-2-like heads
    ATTN_SHAPES = [(16384 // t, 2048 // d, t, d) for t in (1024, 2048, 4096, 8192) for d in (64, 128)]
    LN_SHAPES = [(16384, n) for n in (768, 1024, 1600, 2048, 4096)]
else:
    ATTN_SHAPES = [(4, 4, 256, 64)]
    LN_SHAPES = [(2048, 768)]


def runnable(op: str, backend: str) -> str | None:
    """None if ``backend`` can be benchmarked here, else why not."""
    if backend not in kernels.available_backends(op, DEVICE):
        return f"{op} backend {backend!r} is not available on {DEVICE.type}"
    if backend == "triton" and not CUDA:
        return "triton on the CPU runs in its interpreter: correct, but not a speed to report"
    return None


def cycle(make_inputs):
    """A function returning the next of INPUT_SETS pre-made input tuples on each call."""
    sets = itertools.cycle([make_inputs() for _ in range(INPUT_SETS)])
    return lambda: next(sets)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}-H{}-T{}-D{}".format(*s))
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention(benchmark, backend, shape, mode):
    if reason := runnable("attention", backend):
        pytest.skip(reason)
    B, H, T, D = shape
    needs_grad = mode != "fwd"
    nxt = cycle(lambda: [torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=needs_grad)
                         for _ in range(3)])
    grad_out = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)
    if mode == "bwd":  # time the backward alone: the forward graphs are built beforehand
        outs = itertools.cycle([(kernels.attention(*qkv, backend=backend), qkv) for qkv in
                                [nxt() for _ in range(INPUT_SETS)]])

        def fn():
            out, qkv = next(outs)
            torch.autograd.grad(out, qkv, grad_out, retain_graph=True)
    elif mode == "fwd":
        def fn():
            with torch.no_grad():
                kernels.attention(*nxt(), backend=backend)
    else:
        def fn():
            qkv = nxt()
            torch.autograd.grad(kernels.attention(*qkv, backend=backend), qkv, grad_out)
    seconds = seconds_per_call(benchmark, fn, rounds=5, warmup=1)
    tflops = attention_flops(B, H, T, D, True, mode) / seconds / 1e12
    group = f"attention {mode}, causal, {str(DTYPE).removeprefix('torch.')}, B{B} H{H} T{T} D{D}"
    record(benchmark, Result(group, backend, tflops, "TFLOP/s", baseline="sdpa"))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "M{}-N{}".format(*s))
@pytest.mark.parametrize("backend", LN_BACKENDS)
def test_layer_norm(benchmark, backend, shape, fused, mode):
    if reason := runnable("layer_norm", backend):
        pytest.skip(reason)
    M, N = shape
    grad = mode != "fwd"
    w = torch.randn(N, device=DEVICE, requires_grad=grad)
    b = torch.randn(N, device=DEVICE, requires_grad=grad)
    nxt = cycle(lambda: [torch.randn(M, N, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(2)])
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def run():
        x, r = nxt()
        if fused:
            y, h = kernels.add_layer_norm(x, r, w, b, backend=backend)
            return y, (x, r, w, b)
        return kernels.layer_norm(x, w, b, backend=backend), (x, w, b)

    def fn():
        if not grad:
            with torch.no_grad():
                run()
            return
        y, inputs = run()
        torch.autograd.grad(y, inputs, dy)

    seconds = seconds_per_call(benchmark, fn, rounds=5, warmup=1)
    gbs = ln_bytes(M, N, DTYPE.itemsize, mode, fused) / seconds / 1e9
    name = "add_layer_norm" if fused else "layer_norm"
    group = f"{name} {mode}, {str(DTYPE).removeprefix('torch.')}, M{M} N{N}"
    record(benchmark, Result(group, backend, gbs, "GB/s", baseline="torch"))


def test_peak_copy_bandwidth(benchmark):
    n = (1 << 28) if CUDA else (1 << 24)  # 512 MiB of bf16 on a GPU, 64 MiB of fp32 on the CPU
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    seconds = seconds_per_call(benchmark, lambda: dst.copy_(src), rounds=5, warmup=1)
    record(benchmark, Result("device peaks", "copy bandwidth", 2 * src.nbytes / seconds / 1e9, "GB/s"))


def test_peak_matmul(benchmark):
    n = 8192 if CUDA else 1024
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    seconds = seconds_per_call(benchmark, lambda: a @ b, rounds=5, warmup=1)
    record(benchmark, Result("device peaks", f"matmul {n}^3 {str(DTYPE).removeprefix('torch.')}",
                             2 * n**3 / seconds / 1e12, "TFLOP/s"))
