"""Training-step throughput (tokens/s, and MFU where the device's peak is known).

One step = forward, backward, gradient clipping, AdamW step, on a fixed random batch.

- CPU, fp32, like for like (no biases, exact GELU, learned positions, tied embeddings, as
  nanoGPT's ``bias=False`` model): our model under each attention backend against the
  plain-PyTorch baseline (benchmarks/baseline_gpt.py), and nanoGPT's own model.py with
  ``--nanogpt PATH``, at two shapes: ``recipe``, the shape of ``make train`` (4 layers, 4
  heads, 128 wide, block 128, batch 32), and ``wide`` (6x384, block 256, batch 8: the
  matrix products dominate). ``make bench`` runs the recipe; ``make bench-full`` both.
- CUDA: GPT-2 small (124M), block 1024, bf16 autocast, per attention backend.

Every candidate is built and warmed up first; then rounds go through them in turn, the order
reversed every other round, so that none gains from going first or last. Each figure is the
median over rounds, with the lowest and highest in the note. Our whole trainer against
nanoGPT's whole train.py: benchmarks/vs_nanogpt.py.

    pytest benchmarks/test_train_step.py [--nanogpt ~/src/nanoGPT]
    python -m benchmarks.test_train_step --shape recipe,wide --rounds 15 [--nanogpt ~/src/nanoGPT]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks.baseline_gpt import BaselineGPT
from benchmarks.common import DEVICE, Result, by_mode, record
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT
from gptforge.kernels import available_backends, use_backend

CPU_SHAPES = {
    "recipe": (dict(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128), 32),
    "wide": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 8),
}
if DEVICE.type == "cuda":
    SHAPES = {"gpt2": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8)}
    DTYPE, BIAS, ROUNDS, STEPS_PER_ROUND = torch.bfloat16, True, 5, 3
else:
    SHAPES, DTYPE, BIAS = CPU_SHAPES, torch.float32, False
    ROUNDS, STEPS_PER_ROUND = by_mode(quick=4, full=12), by_mode(quick=3, full=5)
BASELINE = "baseline (plain PyTorch, nanoGPT-style)"


def group_name(shape_name: str) -> str:
    shape, batch = SHAPES[shape_name]
    return (f"train step: {shape['n_layer']}x{shape['n_embd']} ({shape['n_head']} heads), T={shape['block_size']}, "
            f"B={batch}, {str(DTYPE).removeprefix('torch.')}{'' if BIAS else ', no biases, exact GELU'}")


def step_fn(model: torch.nn.Module, idx: torch.Tensor, backend: str | None) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    autocast = torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32)

    def step() -> None:
        with use_backend(attention=backend or "auto"), autocast:
            _, loss = model(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step: Callable[[], None], steps: int) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def nanogpt_model(path: str, shape: dict) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path).expanduser() / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module
    spec.loader.exec_module(module)
    return module.GPT(module.GPTConfig(**shape, dropout=0.0, bias=BIAS))


def candidates(shape: dict, nanogpt: str | None) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (model, attention backend), all of the same shape and initialisation scheme."""
    torch.manual_seed(0)
    found = {BASELINE: (BaselineGPT(**shape, bias=BIAS), None)}
    for backend in ("auto", "torch", "flash_attn", "triton"):  # auto is sdpa on the CPU
        if backend != "auto" and backend not in available_backends("attention", DEVICE):
            continue
        if backend == "triton" and DEVICE.type == "cpu":
            continue  # the interpreter: correct, but not a speed to report
        config = GPTConfig(**shape, bias=BIAS, activation="gelu")
        found[f"ours, attention={backend}"] = (GPT(config), backend)
    if nanogpt:
        found["nanoGPT model.py"] = (nanogpt_model(nanogpt, shape), None)
    return found


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int,
                warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per step of each candidate in every round: all warmed up first, then rounds
    through them in turn, the order reversed every other round."""
    for step in steps.values():
        for _ in range(warmup):  # allocator, kernels' autotuning, first-call costs
            step()
    times, names = {name: [] for name in steps}, list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(seconds_per_step(steps[name], steps_per_round))
    return times


def run_shape(shape_name: str, nanogpt: str | None, rounds: int, steps_per_round: int):
    """(the batch, {name: seconds per step of every round}, {name: CUDA step memory beyond the weights})."""
    shape, batch = SHAPES[shape_name]
    torch.manual_seed(0)
    idx = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]), device=DEVICE)
    steps, step_memory = {}, {}
    for name, (model, backend) in candidates(shape, nanogpt).items():
        steps[name] = step_fn(model.to(DEVICE), idx, backend)
        if DEVICE.type == "cuda":  # what a step allocates beyond the weights (activations, gradients, AdamW state)
            torch.cuda.reset_peak_memory_stats()
            weights = torch.cuda.memory_allocated()
            steps[name]()
            step_memory[name] = torch.cuda.max_memory_allocated() - weights
    return idx, interleaved(steps, rounds, steps_per_round), step_memory


@pytest.mark.parametrize("shape_name", [
    pytest.param(name, marks=[pytest.mark.full] if name == "wide" else []) for name in SHAPES
])
def test_train_step(benchmark, request, shape_name):
    from gptforge.train.ceiling import measured_peak_flops
    from gptforge.train.device import peak_flops

    idx, times, step_memory = run_shape(shape_name, request.config.getoption("--nanogpt"), ROUNDS, STEPS_PER_ROUND)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are ours, recorded below
    flops_per_token = GPT(GPTConfig(**SHAPES[shape_name][0], bias=BIAS)).flops_per_token()
    peak, ceiling = peak_flops(DEVICE, DTYPE), measured_peak_flops(DEVICE, DTYPE)  # datasheet (GPUs), measured
    for name, seconds in times.items():
        tokens = idx.numel()
        median = tokens / statistics.median(seconds)
        note = f"({tokens / max(seconds):,.0f}-{tokens / min(seconds):,.0f} over {ROUNDS} rounds)"
        note += f" (MFU {100 * flops_per_token * median / ceiling:.1f}% of the measured matmul ceiling"
        note += f", {100 * flops_per_token * median / peak:.1f}% of the datasheet's)" if peak else ")"
        if name in step_memory:
            note += f" (step memory beyond the weights {step_memory[name] / 2**30:.1f} GiB)"
        record(benchmark, Result(group_name(shape_name), name, median, "tokens/s", baseline=BASELINE, note=note,
                                 spread=(tokens / max(seconds), tokens / min(seconds))))


def report(times: dict[str, list[float]], base: str = BASELINE) -> str:
    """ms per step: median (min-max) over rounds, and the baseline's median over each one's
    (above 1: faster than the baseline), with the lowest and highest ratio within a round."""
    lines = [f"  {'':40s} {'ms/step: median (min-max)':>28s}  speed vs baseline: median (per-round min-max)"]
    for name, seconds in times.items():
        ms = [1e3 * s for s in seconds]
        ratios = [b / s for b, s in zip(times[base], seconds, strict=True)]
        lines.append(f"  {name:40s} {statistics.median(ms):9.1f} ({min(ms):7.1f}-{max(ms):7.1f})  "
                     f"{statistics.median(times[base]) / statistics.median(seconds):.3f}x "
                     f"({min(ratios):.3f}-{max(ratios):.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training steps side by side, interleaved, in one process.")
    parser.add_argument("--shape", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--nanogpt", default=None, help="a checkout of karpathy/nanoGPT: its model.py too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape_name in args.shape.split(","):
        idx, times, _ = run_shape(shape_name, args.nanogpt, args.rounds, args.steps)
        print(f"{group_name(shape_name)}; {args.rounds} rounds of {args.steps} steps, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}\n{report(times)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
