"""``python -m gptforge.gpt.sample --out_dir DIR``: sample text from a trained model.

DIR is a training run's output folder (its newest checkpoint is used) or a model directory
(``model.safetensors`` + ``model.json``). ``--init_from`` samples from other weights instead:
``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (a local copy, see gptforge/gpt/pretrained.py),
a Hugging Face GPT-2 directory, a nanoGPT ckpt.pt, or any model path.

One sample is printed as it is generated; several are generated together and printed one
after another. Each sample is printed with its prompt, then a line of dashes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptforge.gpt.config import (
    parse_bool,  # torch and the model are imported once the arguments are read: --help is instant
)

SEPARATOR = "---------------"


def _bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` as typed in a shell become a newline and a tab; ``\\\\`` a backslash."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would sample nonsense, before anything is loaded or printed: generate's own
    checks, with the settings named as flags."""
    from gptforge.gpt.generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples, flag="--")
    if not 0 <= args.seed < 2**64:  # what torch.Generator takes
        raise ValueError(f"--seed must be from 0 to {2**64 - 1}, got {args.seed}")


def answers(model, tokenizer, args: argparse.Namespace, generator) -> list[str]:
    """A chat model's responses to ``--prompt`` as a user's message (the chat template of
    gptforge/gpt/chat.py), each up to its end token."""
    from gptforge.gpt.completions import complete

    if args.prompt is None:
        raise ValueError("this is a fine-tuned chat model: give it a --prompt, which it answers as a user's message")
    ids = tokenizer.prompt_ids([dict(role="user", content=_unescape(args.prompt))])
    rows = complete(model, [ids] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                    generator, stop_id=tokenizer.end_id, vocab_limit=tokenizer.vocab_size)
    return [tokenizer.response_text(row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/shakespeare_char_cpu", help="training output folder or model directory")
    p.add_argument("--init_from", default=None,
                   help="gpt2|gpt2-medium|gpt2-large|gpt2-xl|PATH: sample from these weights instead of --out_dir")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: a newline, or the vocabulary's first character if it has none)")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 for greedy decoding; so is any temperature below 1e-38 (float32 cannot divide by it)")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--stop", default=None, metavar="TEXT",
                   help="end a sample after this text (backslash escapes like \\n work); stop once all have it")
    p.add_argument("--kv_cache", type=_bool, default=True, metavar="true|false",
                   help="reuse the keys and values of earlier tokens (fast; default true)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    import torch

    from gptforge.gpt.chat import ChatTokenizer
    from gptforge.gpt.device import pick_device
    from gptforge.gpt.generate import generate_text
    from gptforge.gpt.io import find_model_dir, load_model
    from gptforge.gpt.pretrained import load_pretrained
    from gptforge.gpt.tokenizer import TokenizerUnavailableError, start_tokens, tokenizer_from_meta

    try:
        check_args(args)
        device = pick_device(args.device)
        if args.init_from:
            model, tokenizer_meta = load_pretrained(args.init_from, device)
            source = args.init_from
        else:
            directory = find_model_dir(Path(args.out_dir))
            model, info = load_model(directory, device)
            tokenizer_meta, source = info.get("tokenizer"), directory
        if not tokenizer_meta:
            raise ValueError(f"{source} has no tokenizer description; cannot encode the prompt")
        tokenizer = tokenizer_from_meta(tokenizer_meta)
        if isinstance(tokenizer, ChatTokenizer):  # a fine-tuned model: the prompt is a user's message
            for text in answers(model, tokenizer, args, torch.Generator(device).manual_seed(args.seed)):
                print(text)
                print(SEPARATOR, flush=True)
            return 0
        if args.prompt is None:  # a newline where the vocabulary has one, else a character it has
            args.prompt = tokenizer.decode(start_tokens(tokenizer)) if tokenizer.name == "char" else "\n"
        stop = _unescape(args.stop) if args.stop else None
        if not tokenizer.encode(args.prompt):  # checked before anything is printed
            raise ValueError("the prompt is empty after tokenization; give at least one character")
        generator = torch.Generator(device).manual_seed(args.seed)
        streaming = args.num_samples == 1
        if streaming:
            print(args.prompt, end="", flush=True)
        samples = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.num_samples, args.temperature, args.top_k,
            args.top_p, generator, kv_cache=args.kv_cache, stop=stop,
            on_text=(lambda piece: print(piece, end="", flush=True)) if streaming else None,
        )
    except (FileNotFoundError, ValueError, TokenizerUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if streaming:
        print()
        print(SEPARATOR)
        return 0
    for text in samples:
        print(text)
        print(SEPARATOR, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
