"""SFT batches, packed or padded: which trains faster to the same result.

    pytest benchmarks/test_sft_batching.py -s    # one round of each
    python benchmarks/test_sft_batching.py       # interleaved rounds, medians with their spread

Both sides fine-tune the same model on the same number of examples of the reverse task, from
the same starting weights (a small character GPT trained for a moment on Tiny Shakespeare
would do, but the question is about batches, so random weights serve):

- packed: rows of block_size tokens, as many whole examples in each as fit, attention kept
  within each example (``cu_seqlens``): about 2.5 examples a row here, so 13 rows a batch;
- padded: 32 rows of one example each, as long as the longest of the batch.

So both take the same 200 updates of about 32 examples each (the same batch in examples, so the
same optimisation; a packed batch of 32 rows would be 2.5 times larger and take 2.5 times fewer
updates for the same examples, which trains less far). Reported: seconds to train, examples per
second, and the held-out response loss and accuracy at the end (equal results are the premise:
if they differ, the faster side is not simply better).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script mode, run from anywhere

from gptforge.gpt.config import GPTConfig  # noqa: E402
from gptforge.gpt.io import save_model  # noqa: E402
from gptforge.gpt.model import GPT  # noqa: E402
from gptforge.gpt.tokenizer import CharTokenizer  # noqa: E402
from gptforge.train.config import TrainConfig  # noqa: E402
from gptforge.train.stages import train  # noqa: E402

EXAMPLES = 6400  # per side and round
ROWS = 32


def base_model(directory: Path) -> Path:
    tokenizer = CharTokenizer(" abcdefghijklmnopqrstuvwxyz")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64,
                          bias=False, activation="gelu", rope=True, qk_norm=True))
    save_model(model, directory, tokenizer.to_meta())
    return directory


def run_side(base: Path, out: Path, packing: bool, examples_per_row: float) -> dict:
    steps = EXAMPLES // ROWS  # the same updates on both sides, each from about ROWS examples
    rows = max(1, round(ROWS / examples_per_row)) if packing else ROWS
    cfg = TrainConfig(stage="sft", task="reverse", init_from=str(base), out_dir=str(out), overwrite=True,
                      packing=packing, batch_size=rows, max_iters=steps, optimizer="adamw", learning_rate=3e-3,
                      min_lr=3e-4, warmup_iters=10, eval_interval=steps, eval_iters=10, eval_problems=200,
                      max_new_tokens=12, log_interval=steps, num_samples=0, progress=False, device="cpu",
                      compile="false")
    result = train(cfg, log=lambda *_: None)
    return dict(steps=steps, seconds=result["seconds"], val_loss=result["val_loss"], accuracy=result["accuracy"])


def packed_examples_per_row(base: Path) -> float:
    """How many examples a packed row holds on average (measured from the batches themselves)."""
    from gptforge.gpt.chat import ChatTokenizer
    from gptforge.train.finetune.examples import ExampleBatches, encode_records
    from gptforge.train.finetune.tasks import get_task

    tokenizer = ChatTokenizer(CharTokenizer(" abcdefghijklmnopqrstuvwxyz"))
    problems = get_task("reverse").problems("train", 2000, seed=0)
    examples = encode_records(tokenizer, [(str(i), p.to_json()) for i, p in enumerate(problems)], 64)
    rows = ExampleBatches(examples, ROWS, 64).step_rows(0)
    return sum(map(len, rows)) / len(rows)


def measure(rounds: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"packed": [], "padded": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        per_row = packed_examples_per_row(base)
        for r in range(rounds):
            for side in ("packed", "padded") if r % 2 == 0 else ("padded", "packed"):  # alternate who goes first
                results[side].append(run_side(base, Path(tmp) / side, side == "packed", per_row))
    return results


@pytest.mark.full  # two SFT runs: make bench-full
def test_sft_packed_against_padded():
    results = measure(rounds=1)
    report(results)
    for side in results.values():
        assert side[0]["seconds"] > 0 and 0 <= side[0]["accuracy"] <= 1


def report(results: dict[str, list[dict]]) -> None:
    for side, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        print(f"{side}: {runs[0]['steps']} steps for about {EXAMPLES} examples, {statistics.median(seconds):.1f} s "
              f"(min {min(seconds):.1f}, max {max(seconds):.1f}, {len(runs)} rounds), "
              f"{EXAMPLES / statistics.median(seconds):,.0f} examples/s; held-out loss "
              f"{statistics.median(r['val_loss'] for r in runs):.4f}, accuracy "
              f"{100 * statistics.median(r['accuracy'] for r in runs):.1f}%")
    ratio = [p["seconds"] / q["seconds"] for p, q in zip(results["padded"], results["packed"], strict=True)]
    print(f"padded / packed time: {statistics.median(ratio):.2f}x (rounds {min(ratio):.2f}x to {max(ratio):.2f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    report(measure(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
