"""Training-step throughput (tokens/s, and MFU where the device's peak is known).

One step = forward, backward, gradient clipping, AdamW step, on a fixed random batch.

- CPU: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, fp32): our
  model under each attention backend against the plain-PyTorch baseline (benchmarks/
  baseline_gpt.py, nanoGPT's initialisation and exact GELU, as ours runs here), and nanoGPT's
  own model.py with ``--nanogpt PATH``.
- CUDA: GPT-2 small (124M), block 1024, bf16 autocast, per attention backend.

Every candidate is built and warmed up first; then rounds go through them in turn, the order
reversed every other round, so that none gains from going first or last. Each figure is the
median over rounds, with the lowest and highest in the note. Our whole trainer against
nanoGPT's whole train.py: benchmarks/vs_nanogpt.py.

    pytest benchmarks/test_train_step.py [--nanogpt ~/src/nanoGPT]
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.baseline_gpt import BaselineGPT
from benchmarks.common import DEVICE, Result, by_mode, record
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT
from gptforge.kernels import available_backends, use_backend
from gptforge.train.ceiling import measured_peak_flops
from gptforge.train.device import peak_flops

if DEVICE.type == "cuda":
    SHAPE = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    BATCH, DTYPE, GROUP = 8, torch.bfloat16, "train step: GPT-2 124M, B=8, T=1024, bf16"
    ROUNDS, STEPS_PER_ROUND = 5, 3
else:
    SHAPE = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    BATCH, DTYPE, GROUP = 12, torch.float32, "train step: nanoGPT CPU recipe (4x4x128, T=64, B=12), fp32"
    ROUNDS, STEPS_PER_ROUND = by_mode(quick=6, full=20), 10
BASELINE = "baseline (plain PyTorch, nanoGPT-style)"


def step_fn(model: torch.nn.Module, idx: torch.Tensor, backend: str | None):
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


def seconds_per_step(step) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS_PER_ROUND):
        step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS_PER_ROUND


def nanogpt_model(path: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path).expanduser() / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module
    spec.loader.exec_module(module)
    return module.GPT(module.GPTConfig(**SHAPE, dropout=0.0, bias=True))


def candidates(nanogpt: str | None) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (model, attention backend), all of the same shape and initialisation scheme."""
    torch.manual_seed(0)
    found = {BASELINE: (BaselineGPT(**SHAPE), None)}
    for backend in ("auto", "torch", "sdpa", "flash_attn", "triton"):
        if backend != "auto" and backend not in available_backends("attention", DEVICE):
            continue
        if backend == "triton" and DEVICE.type == "cpu":
            continue  # the interpreter: correct, but not a speed to report
        found[f"ours, attention={backend}"] = (GPT(GPTConfig(**SHAPE, activation="gelu")), backend)
    if nanogpt:
        found["nanoGPT model.py"] = (nanogpt_model(nanogpt), None)
    return found


def test_train_step(benchmark, request):
    torch.manual_seed(0)
    idx = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]), device=DEVICE)
    steps, flops_per_token = {}, GPT(GPTConfig(**SHAPE)).flops_per_token()
    step_memory = {}  # CUDA: what a step allocates beyond the weights (activations, gradients, AdamW state)
    for name, (model, backend) in candidates(request.config.getoption("--nanogpt")).items():
        steps[name] = step_fn(model.to(DEVICE), idx, backend)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            weights = torch.cuda.memory_allocated()
        for _ in range(5):  # warm-up: allocator, kernels' autotuning, first-call costs
            steps[name]()
        if DEVICE.type == "cuda":
            step_memory[name] = torch.cuda.max_memory_allocated() - weights
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(ROUNDS):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(seconds_per_step(steps[name]))
    benchmark.pedantic(steps[BASELINE], rounds=1, iterations=1)  # pytest-benchmark's own record: one step
    peak, ceiling = peak_flops(DEVICE, DTYPE), measured_peak_flops(DEVICE, DTYPE)  # datasheet (GPUs), measured
    for name, seconds in times.items():
        tokens = idx.numel()
        median = tokens / statistics.median(seconds)
        note = f"({tokens / max(seconds):,.0f}-{tokens / min(seconds):,.0f} over {ROUNDS} rounds)"
        note += f" (MFU {100 * flops_per_token * median / ceiling:.1f}% of the measured matmul ceiling"
        note += f", {100 * flops_per_token * median / peak:.1f}% of the datasheet's)" if peak else ")"
        if name in step_memory:
            note += f" (step memory beyond the weights {step_memory[name] / 2**30:.1f} GiB)"
        record(benchmark, Result(GROUP, name, median, "tokens/s", baseline=BASELINE, note=note,
                                 spread=(tokens / max(seconds), tokens / min(seconds))))
