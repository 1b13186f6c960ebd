"""``python -m gpt.sample --out_dir DIR``: sample text from a trained model.

DIR is a training run's output folder (its newest checkpoint is used) or a model directory
(``model.safetensors`` + ``model.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gpt.generate import generate
from gpt.io import WEIGHTS_FILE, load_model
from gpt.tokenizer import TokenizerUnavailableError, tokenizer_from_meta


def find_model_dir(path: Path) -> Path:
    """``path`` itself if it holds a model, else the newest ``checkpoints/step_*`` under it."""
    if (path / WEIGHTS_FILE).is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*"), key=lambda p: p.name)
    steps = [p for p in steps if (p / WEIGHTS_FILE).is_file()]
    if not steps:
        raise FileNotFoundError(f"no model in {path}: expected {WEIGHTS_FILE} or checkpoints/step_*/ (train first)")
    return steps[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/shakespeare_char_cpu", help="training output folder or model directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        directory = find_model_dir(Path(args.out_dir))
        model, info = load_model(directory, device)
        if not info.get("tokenizer"):
            raise ValueError(f"{directory} has no tokenizer description; cannot encode the prompt")
        tokenizer = tokenizer_from_meta(info["tokenizer"])
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("the prompt is empty after tokenization; give at least one character")
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
        generator = torch.Generator(device).manual_seed(args.seed)
        idx = torch.tensor([prompt] * args.num_samples, device=device)
        out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)
    except (FileNotFoundError, ValueError, TokenizerUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in out:
        print(tokenizer.decode(row.tolist()))
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
