"""Generation speed with and without the KV cache, on the CPU char model's shape.

    pytest benchmarks/test_generation.py        # pytest-benchmark, a few rounds each
    python benchmarks/test_generation.py        # tokens/s of both and their ratio

The model is the Tiny Shakespeare CPU preset's shape (4 layers, 4 heads, 128 wide, block 128,
vocab 65) with random weights: speed does not depend on what the weights say. 500 new tokens
from a one-token prompt, so most of them are generated past block_size, where the uncached
path re-reads a full 128-token window per token and the cached one slides (gpt/generate.py).

Both run on one CPU thread: for batch-1 decoding of a model this small, more threads only add
synchronisation, and on a busy machine OpenMP's waiting swamps everything (``--threads N``
in script mode to see it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode, run from anywhere

from gpt.config import GPTConfig  # noqa: E402
from gpt.generate import generate  # noqa: E402
from gpt.model import GPT  # noqa: E402

CHAR_MODEL = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
NEW_TOKENS = 500


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CHAR_MODEL).eval()


def sample(model: GPT, kv_cache: bool) -> torch.Tensor:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    return generate(model, prompt, NEW_TOKENS, temperature=0.8, top_k=200, generator=generator, kv_cache=kv_cache)


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_generation_tokens_per_second(benchmark, kv_cache):
    model = make_model()
    with threads(1):
        out = benchmark.pedantic(sample, args=(model, kv_cache), rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 1 + NEW_TOKENS)
    benchmark.extra_info["new_tokens"] = NEW_TOKENS
    benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / benchmark.stats.stats.median


def measure(repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU seconds per run of each path. The two alternate, so a burst of load
    elsewhere hits both; CPU time (this process's) is what the run itself cost, even when
    other processes share the cores."""
    model = make_model()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in ("kv_cache", "no_cache")}
    sample(model, True), sample(model, False)  # warm-up
    for _ in range(repeats):
        for name, t in times.items():
            wall, cpu = time.perf_counter(), time.process_time()
            sample(model, kv_cache=name == "kv_cache")
            t["wall"].append(time.perf_counter() - wall)
            t["cpu"].append(time.process_time() - cpu)
    return times


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="tokens/s of generation with and without the KV cache")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    with threads(args.threads):
        times = measure(args.repeats)
    print(f"{NEW_TOKENS} new tokens, {CHAR_MODEL.n_layer} layers x {CHAR_MODEL.n_embd} wide, block "
          f"{CHAR_MODEL.block_size}, {args.threads} thread(s), {args.repeats} runs each (medians)")
    for name, t in times.items():
        print(f"  {name:9s} {NEW_TOKENS / statistics.median(t['wall']):6.0f} tokens/s wall clock, "
              f"{NEW_TOKENS / statistics.median(t['cpu']):6.0f} tokens per CPU second")
    for clock in ("wall", "cpu"):
        ratio = statistics.median(times["no_cache"][clock]) / statistics.median(times["kv_cache"][clock])
        print(f"  speedup ({clock}) {ratio:.1f}x")
