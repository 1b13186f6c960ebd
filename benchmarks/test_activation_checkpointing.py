"""Activation checkpointing: what it saves and what it costs, per mode (none, selective: every
other block, full: every block), on one training step of the same model and batch.

Memory is the bytes of the tensors autograd keeps for the backward (counted through
``torch.autograd.graph.saved_tensors_hooks``, so it means the same on any device); on CUDA the
step's peak allocation is reported too. Time is the median step over interleaved rounds (each
round runs every mode, the order reversed every other round), after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import DEVICE, Result, by_mode, record
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT

if DEVICE.type == "cuda":
    SHAPE = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0)
    BATCH, GROUP, ROUNDS = 16, "activation checkpointing: GPT-2 124M, T=1024, B=16, bf16", 5
else:
    SHAPE = dict(vocab_size=65, block_size=128, n_layer=6, n_head=6, n_embd=192, dropout=0.1)
    BATCH, GROUP = 16, "activation checkpointing: CPU char model (6x6x192, T=128, B=16, dropout 0.1), fp32"
    ROUNDS = by_mode(quick=3, full=8)
MODES = ("none", "selective", "full")


def saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes autograd saves for the backward during one forward (each tensor counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(t), t.numel() * t.element_size())  # a tensor saved twice is held once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        _, loss = model(idx, idx)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def autocast():
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")


def test_activation_checkpointing(benchmark):
    torch.manual_seed(0)
    idx = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]), device=DEVICE)
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode] = GPT(GPTConfig(**SHAPE)).to(DEVICE)
        models[mode].set_activation_checkpointing(mode)
    optimizers = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4, fused=True) for m in MODES}

    def step(mode: str) -> None:
        with autocast():
            _, loss = models[mode](idx, idx)
        loss.backward()
        optimizers[mode].step()
        optimizers[mode].zero_grad(set_to_none=True)

    def seconds(mode: str) -> float:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(mode)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    saved = {m: saved_bytes(models[m], idx) for m in MODES}
    peak = {}
    for mode in MODES:  # warm-up, and on CUDA each step's peak beyond what is allocated already
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        step(mode)
        if DEVICE.type == "cuda":
            peak[mode] = torch.cuda.max_memory_allocated() - before
    times: dict[str, list[float]] = {m: [] for m in MODES}

    def rounds() -> None:
        for r in range(ROUNDS):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                times[mode].append(seconds(mode))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    tokens = idx.numel()
    for mode in MODES:
        median = statistics.median(times[mode])
        note = (f"saved for the backward {saved[mode] / 2**20:.1f} MiB ({saved[mode] / saved['none']:.0%} of none); "
                f"step {median * 1e3:.1f} ms (min {min(times[mode]) * 1e3:.1f}, max {max(times[mode]) * 1e3:.1f})")
        if mode in peak:
            note += f"; step peak {peak[mode] / 2**30:.2f} GiB"
        record(benchmark, Result(GROUP, mode, tokens / median, "tokens/s", baseline="none", note=note))
