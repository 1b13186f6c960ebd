"""The fused linear + cross-entropy against the materialised loss, on the CPU, side by side.

1. Loss + backward at GPT-2's vocabulary (50,257) and B*T = 8192 rows: the ``chunked`` backend
   against the logits materialised (``F.cross_entropy`` on fp32 logits), eager and through
   ``torch.compile``. Width C = 128 rather than GPT-2's 768: three (8192 x C x 50257) matmuls
   at C = 768 take about a minute per call on two CPU cores; the logits, which are what the
   fused loss saves, have the same size either way. Each variant runs in a child process of
   its own and reports its peak resident memory (``ru_maxrss``) above what the process held
   once its inputs were made: torch's CPU allocations are plain malloc, which tracemalloc does
   not see, while resident memory sees every byte touched.
2. A GPT-2-BPE training step (4 layers, 4 heads, 128 wide, block 128, batch 8) with the loss
   through the chunked backend against the materialised one: rounds interleaved, median and
   spread, and the losses compared.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import DEVICE, Result, by_mode, record
from gptforge import kernels

ROWS, WIDTH, VOCAB = 8192, 128, 50257
VARIANTS = ("materialised, eager", "materialised, torch.compile", "chunked (fused), eager")
REPEATS = by_mode(2, 3)  # timed calls per variant (make bench, make bench-full)
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU comparison; the GPU suite races the GPU")


def materialised(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as the model computed it before: fp32 logits, then F.cross_entropy."""
    return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(name: str) -> dict:
    """Time and peak memory of loss + backward for one variant, in this (fresh) process."""
    torch.manual_seed(0)
    hidden = torch.randn(ROWS, WIDTH, requires_grad=True)
    weight = (torch.randn(VOCAB, WIDTH) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (ROWS,))
    if name.startswith("chunked"):
        loss_fn = lambda h, w, t: kernels.linear_cross_entropy(h, w, t, backend="chunked")  # noqa: E731
    else:
        # dynamic: one graph for any row count, so the warm-up below can run at a small one
        loss_fn = torch.compile(materialised, dynamic=True) if "compile" in name else materialised

    def call() -> torch.Tensor:
        return loss_fn(hidden, weight, targets)

    # the gradients' own buffers exist before the baseline: only the loss's memory is measured
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    if "compile" in name:
        # compile outside the timing, on 1/64 of the rows: ru_maxrss is a high-water mark, so a
        # warm-up at full size would leave its peak below the baseline and hide the compiled peak
        small = ROWS // 64
        loss_fn(hidden[:small], weight, targets[:small]).backward()
        hidden.grad.zero_()
        weight.grad.zero_()
    base = _peak_bytes()
    seconds, losses = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        loss = call()
        loss.backward()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return dict(seconds=seconds, peak_bytes=_peak_bytes() - base, loss=losses[0])


def _in_child(name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-m", "benchmarks.test_linear_cross_entropy", name], env=env,
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loss_memory_and_time(benchmark):
    results = {name: _in_child(name) for name in VARIANTS}
    group_t = f"linear + cross-entropy, loss + backward (N={ROWS}, C={WIDTH}, V={VOCAB}), calls/s"
    group_m = f"linear + cross-entropy, loss + backward (N={ROWS}, C={WIDTH}, V={VOCAB}), 1/peak GB"
    for name, r in results.items():
        median = statistics.median(r["seconds"])
        note = f"median {median:.2f} s of {r['seconds']}; peak {r['peak_bytes'] / 2**20:.0f} MiB"
        record(benchmark, Result(group_t, name, 1 / median, "calls/s", VARIANTS[0], note))
        record(benchmark, Result(group_m, name, 2**30 / max(r["peak_bytes"], 1), "1/GiB", VARIANTS[0]))
    base = results[VARIANTS[0]]
    fused = results[VARIANTS[2]]
    assert abs(fused["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"])
    benchmark.extra_info["raw"] = results
    benchmark.pedantic(lambda: None, rounds=1)


def test_train_step_gpt2_bpe(benchmark):
    """Interleaved rounds of a training step, materialised vs chunked loss, same initial weights."""
    from gptforge.gpt.config import GPTConfig
    from gptforge.gpt.model import GPT

    config = GPTConfig(vocab_size=VOCAB, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (8, 128))
    targets = torch.randint(0, VOCAB, (8, 128))
    models, optimizers = {}, {}
    for name in ("torch", "chunked"):
        torch.manual_seed(0)
        models[name] = GPT(config)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    times, losses = {n: [] for n in models}, {n: [] for n in models}
    for _round in range(8):
        for name, model in models.items():
            start = time.perf_counter()
            with kernels.use_backend(linear_cross_entropy=name):
                _, loss = model(idx, targets)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    group = "GPT-2-BPE train step (4x4x128, T=128, B=8), steps/s"
    for name, label in (("torch", "materialised loss"), ("chunked", "chunked (fused) loss")):
        t = times[name][1:]  # the first round warms up
        note = f"median {statistics.median(t) * 1e3:.0f} ms, min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f}"
        record(benchmark, Result(group, label, 1 / statistics.median(t), "steps/s", "materialised loss", note))
    benchmark.extra_info.update(times=times, losses=losses)
    for a, b in zip(losses["torch"], losses["chunked"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (losses["torch"], losses["chunked"])
    benchmark.pedantic(lambda: None, rounds=1)


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1])))
