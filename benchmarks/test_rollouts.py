"""RL rollout speed: our batched, KV-cached completions against transformers' ``generate``.

    pytest benchmarks/test_rollouts.py      # pytest-benchmark, both sides
    python benchmarks/test_rollouts.py      # interleaved rounds, medians with their spread

One RL step's rollouts as ``make finetune`` runs them: 16 prompts of the reverse task (their
lengths vary) x 8 sampled completions each (temperature 1), at most 12 new tokens, each
completion stopping at the chat template's end token. The same weights on both sides: a GPT-2
architecture model of the CPU preset's size (4 layers, 128 wide, block 64), exported to the
Hugging Face layout and loaded by ``GPT2LMHeadModel``. transformers gets the prompts left-padded
with an attention mask and ``eos_token_id`` = the end token (it stops a row there and the
batch when all rows have); ours groups the prompts by length instead (gptforge/gpt/completions.py).
Throughput counts the completions' tokens up to and including the end token, on each side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode, run from anywhere

from benchmarks.common import Result, record  # noqa: E402
from gptforge.gpt.chat import ChatTokenizer  # noqa: E402
from gptforge.gpt.completions import complete  # noqa: E402
from gptforge.gpt.config import GPTConfig  # noqa: E402
from gptforge.gpt.model import GPT  # noqa: E402
from gptforge.gpt.tokenizer import CharTokenizer  # noqa: E402
from gptforge.train.finetune.tasks import get_task  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS = 16, 8, 12


def setup() -> tuple[GPT, object, list[list[int]], int]:
    """Our model, the same weights in transformers, the rollout prompts and the end token."""
    transformers = pytest.importorskip("transformers")
    from gptforge.gpt.hf_export import export_hf

    tokenizer = ChatTokenizer(CharTokenizer(" " + "abcdefghijklmnopqrstuvwxyz"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp, warn=lambda *_: None)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    problems = get_task("reverse").problems("train", PROMPTS, seed=0)
    prompts = [tokenizer.prompt_ids([dict(role="user", content=p.prompt)]) for p in problems for _ in range(GROUP)]
    return model, hf, prompts, tokenizer.end_id


def ours(model: GPT, prompts: list[list[int]], end: int, seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    rows = complete(model, prompts, NEW_TOKENS, temperature=1.0, generator=generator, stop_id=end)
    return sum(len(r) for r in rows)


@torch.inference_mode()
def theirs(hf, prompts: list[list[int]], end: int, seed: int) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[end] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                      max_new_tokens=NEW_TOKENS, eos_token_id=end, pad_token_id=end)[:, width:].tolist()
    return sum(row.index(end) + 1 if end in row else len(row) for row in out)


@pytest.mark.parametrize("side", ["ours", "transformers"])
def test_rollout_tokens_per_second(benchmark, side):
    model, hf, prompts, end = setup()
    fn = (lambda: ours(model, prompts, end, 0)) if side == "ours" else (lambda: theirs(hf, prompts, end, 0))
    tokens = fn()
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    record(benchmark, Result("rollouts (16 prompts x 8, CPU)", side, tokens / benchmark.stats.stats.median,
                             "tokens/s", baseline=None if side == "transformers" else "transformers"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    model, hf, prompts, end = setup()
    rates: dict[str, list[float]] = {"ours": [], "transformers": []}
    for r in range(args.rounds + 1):  # round 0 warms both sides up and is not counted
        for side, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            tokens = fn(model if side == "ours" else hf, prompts, end, r)
            if r:
                rates[side].append(tokens / (time.perf_counter() - start))
    for side, values in rates.items():
        print(f"{side:>12}: {statistics.median(values):8,.0f} tokens/s (min {min(values):,.0f}, "
              f"max {max(values):,.0f}, {len(values)} rounds, {torch.get_num_threads()} threads)")
    ratios = sorted(a / b for a, b in zip(rates["ours"], rates["transformers"], strict=True))
    print(f"ours / transformers: {statistics.median(ratios):.2f}x (per-round ratios {ratios[0]:.2f}x to "
          f"{ratios[-1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
