"""Training-step throughput (tokens/s, and MFU where the device's peak is known).

One step = forward, backward, gradient clipping, AdamW step, on a fixed random batch.

- CPU: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, fp32): our
  model under each attention backend against the plain-PyTorch baseline (benchmarks/
  baseline_gpt.py), and against nanoGPT's own model.py with ``--nanogpt PATH``.
- CUDA: GPT-2 small (124M), block 1024, bf16 autocast, per attention backend.

    pytest benchmarks/test_train_step.py [--nanogpt ~/src/nanoGPT]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baseline_gpt import BaselineGPT
from benchmarks.common import DEVICE, Result, record, seconds_per_call
from gpt.config import GPTConfig
from gpt.model import GPT
from kernels import available_backends, use_backend
from train.device import peak_flops

if DEVICE.type == "cuda":
    SHAPE = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    BATCH, DTYPE, GROUP = 8, torch.bfloat16, "train step: GPT-2 124M, B=8, T=1024, bf16"
else:
    SHAPE = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    BATCH, DTYPE, GROUP = 12, torch.float32, "train step: nanoGPT CPU recipe (4x4x128, T=64, B=12), fp32"
BASELINE = "baseline (plain PyTorch, nanoGPT-style)"


def step_fn(model: torch.nn.Module, idx: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    autocast = torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32)

    def step() -> None:
        with autocast:
            _, loss = model(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(benchmark, name: str, model: torch.nn.Module, flops_per_token: int, backend: str | None = None) -> None:
    torch.manual_seed(0)
    model = model.to(DEVICE)
    idx = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]), device=DEVICE)
    tokens = idx.numel()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with use_backend(attention=backend or "auto"):
        seconds = seconds_per_call(benchmark, step_fn(model, idx), rounds=60 if DEVICE.type == "cpu" else 3, warmup=10)
    tokens_per_s = tokens / seconds
    peak = peak_flops(DEVICE, DTYPE)
    note = f"(MFU {100 * flops_per_token * tokens_per_s / peak:.1f}%)" if peak else ""
    if DEVICE.type == "cuda":
        note += f" (peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
    record(benchmark, Result(GROUP, name, tokens_per_s, "tokens/s", baseline=BASELINE, note=note))


def ours() -> GPT:
    return GPT(GPTConfig(**SHAPE))


def test_baseline(benchmark):
    measure(benchmark, BASELINE, BaselineGPT(**SHAPE), ours().flops_per_token())


@pytest.mark.parametrize("backend", ["auto", "torch", "sdpa", "flash_attn", "triton"])
def test_ours(benchmark, backend):
    if backend != "auto" and backend not in available_backends("attention", DEVICE):
        pytest.skip(f"attention backend {backend!r} is not available on {DEVICE.type}")
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("triton on the CPU runs in its interpreter: correct, but not a speed to report")
    model = ours()
    measure(benchmark, f"ours, attention={backend}", model, model.flops_per_token(), backend)


def test_nanogpt(benchmark, request):
    path = request.config.getoption("--nanogpt")
    if not path:
        pytest.skip("pass --nanogpt PATH (a nanoGPT checkout) to benchmark its model.py")
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path).expanduser() / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module
    spec.loader.exec_module(module)
    config = module.GPTConfig(**SHAPE, dropout=0.0, bias=True)
    measure(benchmark, "nanoGPT model.py", module.GPT(config), ours().flops_per_token())
