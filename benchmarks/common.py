"""Timing and reporting shared by the benchmarks.

On the CPU, pytest-benchmark times the call (median of its rounds). On CUDA, the figure is
``triton.testing.do_bench``'s median (warm-up, synchronised, L2 flushed between runs), since
pytest-benchmark does not synchronise the GPU. Every result is also kept in ``RESULTS`` for
the summary tables that benchmarks/conftest.py prints at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.suite.results import format_number

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# make bench-full (GPT_BENCH_FULL=1): every side-by-side run, with its full rounds; make bench: the
# same benchmarks with fewer rounds, and the longest ones (marked ``full``) skipped
FULL = os.environ.get("GPT_BENCH_FULL", "") not in ("", "0")


def by_mode(quick: int, full: int) -> int:
    """A count of rounds or steps: ``full`` under make bench-full, else ``quick``."""
    return full if FULL else quick


@dataclass
class Result:
    group: str  # one table per group
    name: str  # the row: a backend, strategy or model
    value: float  # higher is better
    unit: str
    baseline: str | None = None  # the row of the same group this one is compared with
    note: str = ""
    spread: tuple[float, float] | None = None  # lowest and highest over rounds, where there were several


RESULTS: list[Result] = []


def seconds_per_call(benchmark, fn: Callable[[], object], rounds: int = 10, warmup: int = 2) -> float:
    """Median seconds of one call of ``fn`` on DEVICE, recorded in pytest-benchmark's stats."""
    if DEVICE.type == "cuda":
        from triton.testing import do_bench

        def synced() -> None:
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=3, warmup_rounds=1)
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return benchmark.stats.stats.median


def record(benchmark, result: Result) -> Result:
    benchmark.extra_info.update(group=result.group, name=result.name, value=result.value, unit=result.unit,
                                baseline=result.baseline, device=device_name())
    RESULTS.append(result)
    return result


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def summary_tables(results: list[Result]) -> str:
    """One table per group: each row's figure and its ratio to the group's baseline."""
    lines = [f"benchmark results on {device_name()}"]
    for group in dict.fromkeys(r.group for r in results):
        rows = [r for r in results if r.group == group]
        lines.append(f"\n{group}")
        width = max(len(r.name) for r in rows)
        for r in rows:
            base = next((b for b in rows if b.name == r.baseline), None)
            ratio = f"{r.value / base.value:6.2f}x vs {base.name}" if base and base.value else ""
            warning = spread_warning(r, base) if base is not None and base is not r else ""
            lines.append(f"  {r.name:<{width}}  {format_number(r.value):>12} {r.unit:<9} {ratio} {r.note}{warning}"
                         .rstrip())
    return "\n".join(lines)


def spread_warning(result: Result, base: Result) -> str:
    """A warning when the spread of either figure over its rounds is wider than the difference
    between them: the ratio is then within the noise, not a measured effect."""
    effect = abs(result.value - base.value)
    widths = [r.spread[1] - r.spread[0] for r in (result, base) if r.spread is not None]
    if widths and max(widths) > effect:
        return (f"  WARNING: spread {format_number(max(widths))} {result.unit} is wider than the difference "
                f"{format_number(effect)}: not a measured effect")
    return ""


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    """FLOPs of attention over (B, H, T, D): 4·B·H·T²·D forward (two matmuls), halved when
    causal; the backward counts 2.5 times the forward (FlashAttention's convention)."""
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def ln_bytes(M: int, N: int, elem: int, mode: str, fused: bool) -> float:
    """Bytes a LayerNorm over (M, N) must move. The forward reads x (and residual) and writes y
    (and h); the backward reads x, dy (and dh) and writes dx; weights and statistics are
    negligible next to M*N."""
    fwd = (4 if fused else 2) * M * N * elem
    bwd = (4 if fused else 3) * M * N * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
