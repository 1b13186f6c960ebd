"""Stages c and d: our attention and LayerNorm kernels beside the peers, on the same inputs.

Attention (stage c): causal, bf16, T 1024 to 8192, D 64 and 128, 16k tokens per call (B = 16384
/ T, H = 2048 / D). Forward, and forward + backward, as TFLOP/s (4·B·H·T²·D for the forward,
halved for causal; the backward counts 2.5 times that). Ours runs as the autotuner picks
("triton") and as every kernel variant this GPU's candidate lists hold, forced one at a time
("triton[tma]", "triton[today]" for the kernel as first written, ...; gptforge/kernels/triton/configs.py),
so the variants race each other and the peers on the same inputs. The peers: SDPA with each of
its CUDA backends pinned (FlashAttention-2, cuDNN, memory-efficient), Dao-AILab's flash_attn
where installed, and the plain-PyTorch reference where its T x T scores fit (T <= 2048). Every
row gives its ratio to SDPA's flash backend, and each shape records its winner: the fastest
Triton variant, and the fastest of all (group "attention winners").

LayerNorm (stage d): LayerNorm and the fused residual add + LayerNorm, 16k rows of N 768,
1024, 1600 and 4096, bf16: forward and forward + backward as GB/s of bytes read plus written,
and as a share of the copy bandwidth the card stage measured. The peer: ``F.layer_norm``
(after ``x + residual`` for the fused op).

Packed documents race padding first (benchmarks/suite/documents_bench.py); stage d opens with the
fused linear + cross-entropy against the materialised loss (benchmarks/suite/loss_bench.py).

Every backend is warmed up (compiled, autotuned) before any timing, and the backends of one
shape are timed in interleaved rounds (stage.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import attention_flops, ln_bytes
from benchmarks.suite.documents_bench import run_packed_attention
from benchmarks.suite.loss_bench import run_fused_loss
from benchmarks.suite.stage import Stage
from gptforge import kernels
from gptforge.kernels.triton import configs

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
BASELINE = "sdpa-flash"
TORCH_REFERENCE_MAX_T = 2048  # beyond it the reference's fp32 T x T scores cost more than they tell
ROUNDS = 5


def attention_peers(stage: Stage) -> dict[str, Callable | str]:
    """Name -> attention(q, k, v) on causal inputs, or a sentence saying why it is absent."""
    peers: dict[str, Callable | str] = {
        "triton": lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="triton")
    }
    for variant in configs.race_variants(configs.generation(torch.device(stage.device))):
        peers[f"triton[{variant}]"] = Forced(variant)
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        peers[name] = sdpa
    if stage.flash_attn_installed():
        peers["flash_attn"] = lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="flash_attn")
    else:
        peers["flash_attn"] = "skipped: flash_attn is not installed here"
    peers["torch"] = lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="torch")
    return peers


class Forced:
    """Our attention with one kernel variant forced. Call it through ``timed``: the variant
    must stay forced until the backward has run too, and autograd runs that after the call."""

    def __init__(self, variant: str) -> None:
        self.variant = variant

    def __call__(self, q, k, v):
        return kernels.attention(q, k, v, causal=True, backend="triton")

    def timed(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with configs.force_variant(self.variant):
                return fn()

        return run


def _warm(stage: Stage, group: str, fns: dict[str, Callable]) -> dict[str, Callable]:
    """Call each fn twice (compile, autotune); a backend that cannot run gets a note instead."""
    ready = {}
    for name, fn in fns.items():
        try:
            fn()
            fn()
            stage.sync()
            ready[name] = fn
        except Exception as e:  # e.g. "No available kernel" from a pinned SDPA backend; a compile error
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            stage.note(group, name, f"cannot run here: {first_line[:160]}")
            if stage.cuda:
                torch.cuda.empty_cache()
    return ready


def _record(stage: Stage, group: str, times: dict, work: float, unit: str, shape: str, baseline: str,
            notes: Callable[[float], str] = lambda value: "") -> None:  # fmt: skip
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    for name, (median, fastest, slowest) in times.items():
        value = work / median / scale
        stage.figure(group, name, value, unit, shape=shape, backend=name, baseline=baseline,
                     spread=[work / slowest / scale, work / fastest / scale], note=notes(value))  # fmt: skip


def run_attention(stage: Stage) -> None:
    stage.start_tuning()
    if stage.cuda:
        shapes = [(16384 // T, 2048 // D, T, D) for T in (1024, 2048, 4096, 8192) for D in (64, 128)]
    else:
        shapes = [(1, 2, 64, 32)]
    peers = attention_peers(stage)
    run_packed_attention(stage, _warm)  # packed documents against padding first: a short race
    stage.record_tuning()
    for i, shape in enumerate(shapes):
        if stage.left() < 10:
            stage.note("attention", "not reached", f"{len(shapes) - i} of {len(shapes)} shapes: out of time")
            break
        for mode in ("fwd", "fwd+bwd"):
            time_attention(stage, peers, *shape, mode)
        stage.record_tuning()  # after every shape, so a kill loses none of the winners


def time_attention(stage: Stage, peers: dict[str, Callable | str], B: int, H: int, T: int, D: int, mode: str) -> None:
    """Every peer on the same causal bf16 inputs, warmed up, then timed in interleaved rounds."""
    shape = f"B{B} H{H} T{T} D{D}"
    group = f"attention {mode}, causal, bf16, {shape}"
    q, k, v, do = (torch.randn(B, H, T, D, device=stage.device, dtype=torch.bfloat16) for _ in range(4))
    if mode == "fwd+bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    generation = configs.generation(q.device)
    fns = {}
    for name, attn in peers.items():
        forced = isinstance(attn, Forced)
        if isinstance(attn, str):
            stage.note(group, name, attn)
        elif name == "torch" and T > TORCH_REFERENCE_MAX_T:
            continue
        elif mode == "fwd" and forced and "fwd" not in configs.variant_kinds(generation, attn.variant):
            stage.note(group, name, f"{attn.variant} changes the backward only; its forward is the autotuned one")
        elif mode == "fwd":
            fns[name] = lambda attn=attn: _no_grad(attn, q, k, v)
        else:
            fns[name] = lambda attn=attn: torch.autograd.grad(attn(q, k, v), (q, k, v), do)
        if forced and name in fns:
            fns[name] = attn.timed(fns[name])
    times = stage.interleaved(_warm(stage, group, fns), stage.rounds(ROUNDS))
    work = attention_flops(B, H, T, D, True, mode)
    _record(stage, group, times, work, "TFLOP/s", shape, BASELINE)
    record_winners(stage, f"{mode} {shape}", times, work)


def record_winners(stage: Stage, case: str, times: dict, work: float) -> None:
    """The fastest Triton row of one shape and the fastest row of all, by median time, each
    with its ratio to SDPA's flash backend: what the candidate lists' order should follow."""
    ours = {name: t for name, t in times.items() if name.startswith("triton")}
    if not ours:
        return
    baseline = times.get(BASELINE)
    for label, pool in (("fastest triton variant", ours), ("fastest of all", times)):
        name = min(pool, key=lambda n: pool[n][0])
        median = pool[name][0]
        ratio = f", {baseline[0] / median:.2f}x {BASELINE}" if baseline else ""
        stage.figure("attention winners", f"{case}: {label}", work / median / 1e12, "TFLOP/s", shape=case,
                     backend=name, note=f"{name}{ratio}")  # fmt: skip


def _no_grad(fn: Callable, *args):
    with torch.no_grad():
        return fn(*args)


def run_layer_norm(stage: Stage) -> None:
    run_fused_loss(stage, _warm)  # the other row-wise op first: the fused loss against the materialised one
    rows, widths = (16384, (768, 1024, 1600, 4096)) if stage.cuda else (64, (128,))
    copy_ceiling = stage.ceiling("copy")
    if copy_ceiling is None:
        stage.note("layer_norm", "copy ceiling", "not measured in this run (the card stage did not run): "
                   "no % of the ceiling")  # fmt: skip
    for i, N in enumerate(widths):
        if stage.left() < 5:
            stage.note("layer_norm", "not reached", f"{len(widths) - i} of {len(widths)} widths: out of time")
            break
        for fused in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                time_layer_norm(stage, rows, N, fused, mode, copy_ceiling)


def time_layer_norm(stage: Stage, rows: int, N: int, fused: bool, mode: str, copy_ceiling: float | None) -> None:
    """Ours and PyTorch's on the same bf16 inputs, warmed up, then timed in interleaved rounds."""
    shape, dtype = f"M{rows} N{N}", torch.bfloat16
    group = f"{'add_layer_norm' if fused else 'layer_norm'} {mode}, bf16, {shape}"
    grad = mode == "fwd+bwd"
    x, residual = (torch.randn(rows, N, device=stage.device, dtype=dtype, requires_grad=grad) for _ in range(2))
    wb = ((1 + 0.1 * torch.randn(N, device=stage.device, dtype=dtype)).requires_grad_(grad),
          (0.1 * torch.randn(N, device=stage.device, dtype=dtype)).requires_grad_(grad))  # fmt: skip
    # fused: h feeds the next residual branch, so its gradient flows back too
    cotangents = tuple(torch.randn(rows, N, device=stage.device, dtype=dtype) for _ in range(2 if fused else 1))
    inputs = (x, residual, *wb) if fused else (x, *wb)
    fns = {}
    for name, f in {"triton": _ours(fused), "torch": _torch_layer_norm(fused)}.items():
        if grad:
            fns[name] = lambda f=f: torch.autograd.grad(f(x, residual, wb), inputs, cotangents)
        else:
            fns[name] = lambda f=f: _no_grad(f, x, residual, wb)

    def share(value: float) -> str:
        return f"{100 * value / copy_ceiling:.0f}% of the measured copy bandwidth" if copy_ceiling else ""

    times = stage.interleaved(_warm(stage, group, fns), stage.rounds(ROUNDS))
    _record(stage, group, times, ln_bytes(rows, N, dtype.itemsize, mode, fused), "GB/s", shape, "torch", share)


def _ours(fused: bool) -> Callable:
    """(y,) or (y, h) from our kernels."""
    if fused:
        return lambda x, r, wb: kernels.add_layer_norm(x, r, *wb, backend="triton")
    return lambda x, r, wb: (kernels.layer_norm(x, *wb, backend="triton"),)


def _torch_layer_norm(fused: bool) -> Callable:
    """The same from PyTorch's own ops: an add, then F.layer_norm."""

    def add_then_layer_norm(x, r, wb):
        h = x + r
        return F.layer_norm(h, h.shape[-1:], *wb), h

    if fused:
        return add_then_layer_norm
    return lambda x, r, wb: (F.layer_norm(x, x.shape[-1:], *wb),)
