"""Stage b: our Triton kernels against float64 references, run natively.

The tests in tests/ prove the kernels through Triton's interpreter on the CPU; this stage
proves the same on the GPU, where the compiled code (tensor cores, tf32, pipelining) runs. A
quick grid, most important first, since the stage stops between two cases when its time is up
(what it did not reach is recorded):

1. attention, bf16, causal (the training path), with each candidate config the suite's
   autotuner may pick, D 64 and 128: the model's layout ((B, T, H, D) storage seen as
   (B, H, T, D)) at T 1024, then ragged T (127, 257), then T 1 and decoding (one query
   against 300 keys);
2. LayerNorm and add+LayerNorm as autocast runs them (bf16 activations, fp32 parameters, the
   residual stream in fp32 or bf16), N 768, 1600, 4096;
   then packed documents (cu_seqlens) at T 1024, each candidate, and each variant at D 64;
3. the cases of 1 for every kernel variant this GPU's lists hold (the attention stage races
   them), each forced with its first config;
4. attention non-causal in bf16; then fp16 and fp32, causal and not; LayerNorm fp16 and fp32.

Each case draws fresh random inputs, fills every buffer the kernels allocate with NaN first
(so an element left unwritten fails), and compares the output and every gradient with the
same function computed in float64, as max |error| / max(max |reference|, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.suite.stage import TUNING_CANDIDATES, Stage
from gptforge import kernels
from gptforge.kernels import reference
from gptforge.kernels.triton import common as triton_common
from gptforge.kernels.triton import configs, tuning

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
LN_TOLERANCE = {FP32: 2e-5, FP16: 2e-2, BF16: 2e-2}


def attention_tolerance(dtype: torch.dtype, cuda: bool) -> float:
    # fp32 dots run as tf32 on a GPU; the interpreter computes them in full fp32
    return {FP32: 1e-3 if cuda else 1e-5, FP16: 1e-2, BF16: 2e-2}[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1); NaN anywhere gives NaN."""
    actual = actual.detach().double()
    if actual.isnan().any():
        return float("nan")
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attention_case(stage: Stage, B: int, H: int, T_q: int, T_k: int, D: int, causal: bool, dtype: torch.dtype,
                   model_layout: bool = False, config: str = "", lengths: list[int] | None = None) -> None:  # fmt: skip
    """Output, dq, dk, dv of the triton backend against the float64 reference; ``lengths``:
    packed documents of these lengths (filling the B * T tokens), as ``cu_seqlens``."""
    def fresh(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, device=stage.device)
        if model_layout:  # stored (B, T, H, D) as the model's projections leave it, viewed (B, H, T, D)
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.to(dtype)

    q, k, v = (fresh(B, H, t, D).requires_grad_() for t in (T_q, T_k, T_k))
    do = fresh(B, H, T_q, D)
    cu = None if lengths is None else torch.tensor([0, *lengths], device=stage.device).cumsum(0).to(torch.int32)
    out = kernels.attention(q, k, v, causal=causal, backend="triton", cu_seqlens=cu)
    grads = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference.attention(q64, k64, v64, causal, 0.0, 1.0 / math.sqrt(D), cu_seqlens=cu)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())

    group = f"attention {_dtype_name(dtype)} D{D}"
    case = f"B{B} H{H} Tq{T_q} Tk{T_k} {'causal' if causal else 'full'}{' model layout' if model_layout else ''}"
    case += f" {len(lengths)} packed documents" if lengths else ""
    tolerance = attention_tolerance(dtype, stage.cuda)
    for what, actual, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64), strict=True):
        stage.check(group, f"{case} {what}", relative_error(actual, expected), tolerance, note=config)


def layer_norm_case(stage: Stage, rows: int, N: int, dtype: torch.dtype, param_dtype: torch.dtype,
                    residual_dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """y, dx (and dresidual), dweight, dbias of layer_norm (or add_layer_norm) against float64."""
    x = (3 * torch.randn(rows, N, device=stage.device) + 0.5).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(N, device=stage.device)).to(param_dtype).requires_grad_()
    bias = (0.5 * torch.randn(N, device=stage.device)).to(param_dtype).requires_grad_()
    dy = torch.randn(rows, N, device=stage.device).to(dtype)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))

    if residual_dtype is None:
        inputs, inputs64, names = (x, weight, bias), (x64, w64, b64), ("dx", "dweight", "dbias")
        outputs = (kernels.layer_norm(x, weight, bias, backend="triton"),)
        outputs64 = (F.layer_norm(x64, (N,), w64, b64, 1e-5),)
        cotangents = (dy,)
        group = f"layer_norm {_dtype_name(dtype)}"
    else:
        residual = (3 * torch.randn(rows, N, device=stage.device)).to(residual_dtype).requires_grad_()
        r64 = residual.detach().double().requires_grad_()
        y, h = kernels.add_layer_norm(x, residual, weight, bias, backend="triton")
        # h is x + residual rounded to its dtype; the reference normalises that same h and
        # passes gradients straight through the rounding
        h64 = x64 + r64
        h64 = h64 + (h.detach().double() - h64).detach()
        dh = torch.randn_like(h)
        inputs, inputs64 = (x, residual, weight, bias), (x64, r64, w64, b64)
        names = ("dx", "dresidual", "dweight", "dbias")
        outputs, outputs64 = (y, h), (F.layer_norm(h64, (N,), w64, b64, 1e-5), h64)
        cotangents = (dy, dh)
        group = f"add_layer_norm {_dtype_name(dtype)} + {_dtype_name(residual_dtype)} residual"
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    grads64 = torch.autograd.grad(outputs64, inputs64, tuple(c.double() for c in cotangents))

    case = f"{rows}x{N}, params {_dtype_name(param_dtype)}"
    tolerance = LN_TOLERANCE[dtype]
    stage.check(group, f"{case} y", relative_error(outputs[0], outputs64[0].detach()), tolerance)
    for what, actual, expected in zip(names, grads, grads64, strict=True):
        stage.check(group, f"{case} {what}", relative_error(actual, expected), tolerance)


def grid(stage: Stage) -> list[tuple[str, Callable[[], None]]]:
    """(label, case) pairs, most important first. Compiling dominates this stage on a GPU, so
    the cases that compile what the later stages run come first: the model's layout at T 1024
    specialises the kernels exactly as the benchmarks and the training step do (every length
    and stride a multiple of 16), so Triton's cache hands those binaries on to them."""
    if stage.rehearse:  # the interpreter: a handful of tiny cases through the same code
        shapes = [[(1, 2, 17, 17, False)], [(1, 1, 1, 20, False)]]
        ragged, ln_sizes, head_dims = shapes[0], [(5, 100)], (16, 32)
    else:  # (B, H, Tq, Tk, model layout), grouped by how Triton specialises them
        shapes = [[(2, 4, 1024, 1024, True)], [(2, 3, 127, 127, False), (1, 2, 257, 257, False)],
                  [(1, 3, 1, 1, False), (2, 3, 1, 300, False)]]  # fmt: skip
        ragged, ln_sizes, head_dims = shapes[1], [(333, 768), (97, 1600), (64, 4096)], (64, 128)
    cases: list[tuple[str, Callable[[], None]]] = []

    def attention(dtype: torch.dtype, causal: bool, candidates: range, groups: list[list[tuple]]) -> None:
        for group in groups:
            for candidate in candidates:
                for D in head_dims:
                    for B, H, T_q, T_k, layout in group:
                        def case(B=B, H=H, T_q=T_q, T_k=T_k, D=D, layout=layout, candidate=candidate) -> None:
                            with tuning.only_candidate(candidate):
                                attention_case(stage, B, H, T_q, T_k, D, causal, dtype, layout,
                                               f"candidate {candidate}")  # fmt: skip
                        cases.append((f"attention {dtype} causal={causal} D{D} candidate {candidate}", case))

    def layer_norm(dtype: torch.dtype, param_dtype: torch.dtype, residual_dtypes) -> None:
        for rows, N in ln_sizes:
            for residual_dtype in residual_dtypes:
                cases.append((f"layer_norm {dtype} N{N}",
                              lambda rows=rows, N=N, r=residual_dtype: layer_norm_case(stage, rows, N, dtype,
                                                                                       param_dtype, r)))  # fmt: skip

    attention(BF16, True, range(TUNING_CANDIDATES), shapes)  # the training path, every candidate
    # packed documents (bf16, causal): boundaries on and off the tiles' edges, documents of one
    # token, a row holding one document; every candidate, then every variant at the first D
    packed = (1, 2, 17, [1, 5, 11]) if stage.rehearse else (2, 4, 1024, [1, 127, 128, 3, 300, 465, 1024])
    for variant in [None, *configs.race_variants(configs.generation(torch.device(stage.device)))]:
        for candidate in range(TUNING_CANDIDATES) if variant is None else range(1):
            for D in head_dims if variant is None else head_dims[:1]:

                def case(D=D, variant=variant, candidate=candidate, B_H_T_lengths=packed) -> None:
                    B, H, T, lengths = B_H_T_lengths
                    with configs.force_variant(variant), tuning.only_candidate(candidate):
                        attention_case(stage, B, H, T, T, D, True, BF16, not stage.rehearse,
                                       f"{variant or 'candidate'} {candidate}", lengths)  # fmt: skip

                cases.append((f"attention bf16 packed documents D{D} {variant or 'candidate'} {candidate}", case))
    layer_norm(BF16, FP32, (None, FP32, BF16))  # as autocast runs it
    for variant in configs.race_variants(configs.generation(torch.device(stage.device))):
        for D in head_dims:
            for B, H, T_q, T_k, layout in [case for group in shapes for case in group]:

                def case(B=B, H=H, T_q=T_q, T_k=T_k, D=D, layout=layout, variant=variant) -> None:
                    with configs.force_variant(variant), tuning.only_candidate(0):
                        attention_case(stage, B, H, T_q, T_k, D, True, BF16, layout, f"variant {variant}")

                cases.append((f"attention bf16 causal D{D} variant {variant}", case))
    attention(BF16, False, range(1), [ragged])
    for dtype in (FP16, FP32):
        attention(dtype, True, range(1), [ragged])
        attention(dtype, False, range(1), [ragged])
        layer_norm(dtype, dtype, (None, dtype))
    return cases


def run(stage: Stage) -> None:
    torch.manual_seed(0)
    triton_common.POISON_OUTPUTS = True  # every buffer the launchers allocate starts as NaN
    tuning.limit_candidates(TUNING_CANDIDATES)
    cases = grid(stage)
    for done, (label, case) in enumerate(cases):
        if stage.left() < 5:
            stage.note("parity", "not reached", f"{len(cases) - done} of {len(cases)} cases: out of time "
                       f"(next: {label})")  # fmt: skip
            return
        case()
