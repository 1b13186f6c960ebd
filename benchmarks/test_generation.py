"""Generation speed with and without the KV cache.

    pytest benchmarks/test_generation.py        # pytest-benchmark, a few rounds each
    python benchmarks/test_generation.py        # CPU tokens/s of both paths and their ratio

500 new tokens from a one-token prompt, sampled (temperature 0.8, top-k 200) with random
weights: speed does not depend on what the weights say. Models:

- ``char``: the Tiny Shakespeare CPU preset's shape (4 layers, 4 heads, 128 wide, block
  128, vocab 65). Most tokens are generated past block_size, where the uncached path
  re-reads a full 128-token window per token and the cached one slides (gptforge/gpt/generate.py).
- ``gpt2``: GPT-2 124M's shape (block 1024, vocab 50304) in bf16 autocast, on CUDA only
  (uncached, it would take minutes per round on a laptop CPU).

On the CPU both paths run on one thread: for batch-1 decoding of a model this small, more
threads do not help the cached path (its ops are too small to split), while they do speed up
the uncached path's 128-token matrix products; ``--threads N`` in script mode shows that.
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

from benchmarks.common import DEVICE, Result, record  # noqa: E402
from gptforge.gpt.config import GPTConfig  # noqa: E402
from gptforge.gpt.generate import generate  # noqa: E402
from gptforge.gpt.model import GPT  # noqa: E402

MODELS = {
    "char": GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}
CHAR_MODEL = MODELS["char"]
NEW_TOKENS = 500


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_model(config: GPTConfig = CHAR_MODEL, device: torch.device | str = "cpu") -> GPT:
    torch.manual_seed(0)
    return GPT(config).to(device).eval()


def sample(model: GPT, kv_cache: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    half = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with half:
        out = generate(model, prompt, NEW_TOKENS, temperature=0.8, top_k=200, generator=generator, kv_cache=kv_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the loop never waits for the GPU: time until it is done
    return out


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_generation_tokens_per_second(benchmark, model_name, kv_cache):
    if model_name == "gpt2" and DEVICE.type != "cuda":
        pytest.skip("GPT-2 124M generation is benchmarked on CUDA only (uncached, minutes per round on a CPU)")
    model = make_model(MODELS[model_name], DEVICE)
    with threads(1) if DEVICE.type == "cpu" else contextlib.nullcontext():
        out = benchmark.pedantic(sample, args=(model, kv_cache), rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 1 + NEW_TOKENS)
    name = "kv_cache" if kv_cache else "no_cache"
    threads_note = ", 1 thread" if DEVICE.type == "cpu" else ", bf16"
    record(benchmark, Result(f"generation, {NEW_TOKENS} tokens, {model_name} model{threads_note}", name,
                             NEW_TOKENS / benchmark.stats.stats.median, "tokens/s", baseline="no_cache"))


def measure(repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU seconds per run of each path on the CPU char model. The two
    alternate, so a burst of load elsewhere hits both; CPU time (this process's) is what the
    run itself cost, even when other processes share the cores."""
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
    p = argparse.ArgumentParser(description="CPU tokens/s of generation with and without the KV cache")
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
