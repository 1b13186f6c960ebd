"""Weights from elsewhere: OpenAI's GPT-2 (Hugging Face layout), nanoGPT checkpoints, and
export of our models to the Hugging Face GPT-2 layout.

    model, tokenizer_meta = load_pretrained("gpt2")            # or gpt2-medium/-large/-xl
    model, tokenizer_meta = load_pretrained("path/to/hf_dir")  # config.json + model.safetensors
    model, tokenizer_meta = load_pretrained("out/ckpt.pt")     # nanoGPT
    export_hf(model, "hf_dir", tokenizer_meta)                  # transformers can load it

    python -m gptforge.gpt.pretrained export --out_dir RUN --to DIR   # --overwrite replaces DIR whole

Nothing is downloaded: the GPT-2 names resolve to local directories (``$GPT_MODELS_DIR/<name>``
or the Hugging Face cache). Each source has its file: gptforge/gpt/hf_import.py (GPT-2 in the
Hugging Face layout), gptforge/gpt/nanogpt_import.py (nanoGPT checkpoints),
gptforge/gpt/hf_export.py (the way out, to transformers); ours are model directories
(gptforge/gpt/io.py). A model whose tokenizer was trained on the user's corpus
(gptforge/gpt/tokenizer_training.py) is exported with that tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from gptforge.gpt.folders import FolderBusyError, FolderLock, check_replaceable, staged_folder
from gptforge.gpt.hf_export import EXPORT_DIR_FILES, HF_TOKENIZER_FILES, export_hf
from gptforge.gpt.hf_import import GPT2_NAMES, HF_BIN, HF_CONFIG, HF_SAFETENSORS, find_gpt2, load_hf
from gptforge.gpt.io import CONFIG_FILE, WEIGHTS_FILE, find_model_dir, load_model
from gptforge.gpt.model import GPT
from gptforge.gpt.nanogpt_import import NANOGPT_CKPT, load_nanogpt
from gptforge.gpt.tokenizer import describe_tokenizer, same_tokenizer


def load_pretrained(
    spec: str | Path,
    device: str | torch.device = "cpu",
    dropout: float | None = None,
    block_size: int | None = None,
) -> tuple[GPT, dict | None]:
    """Load a GPT and its tokenizer meta (for ``gptforge.gpt.tokenizer.tokenizer_from_meta``) from ``spec``:

    - ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``: OpenAI's weights from a local copy;
    - a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin), or
      a GPT-2 ``.safetensors`` file (its shape read from a config.json beside it, else from
      the tensors, with GPT-2's 64-wide heads);
    - a nanoGPT checkpoint: ``ckpt.pt`` or the folder holding it;
    - one of ours: a model directory (model.json) or a training run's output folder.

    ``dropout`` replaces the checkpoint's (for fine-tuning); ``block_size`` crops the position
    embedding to a shorter context. The tokenizer meta is None when the source does not say
    (a character-level nanoGPT checkpoint).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in GPT2_NAMES and not path.exists():
        path = find_gpt2(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is neither a file or folder nor one of {', '.join(GPT2_NAMES)}"
        )
    model, tokenizer_meta = _load_any(path)
    if dropout is not None:
        model.set_dropout(dropout)
    if block_size is not None:
        crop_block_size(model, block_size)
    return model.to(device), tokenizer_meta


def load_for_finetuning(
    spec: str, tokenizer_meta: dict, vocab_size: int, dropout: float, block_size: int, data: str = "the data"
) -> tuple[GPT, list[str]]:
    """Pretrained weights (``load_pretrained``) to go on training on ``data``, whose tokens
    ``tokenizer_meta`` describes (``vocab_size`` of them). A ValueError if the weights cannot
    read those tokens (another tokenizer, a smaller vocabulary); also returns what the caller
    should tell the user."""
    model, weights_tokenizer = load_pretrained(spec, dropout=dropout, block_size=block_size)
    if weights_tokenizer is not None and not same_tokenizer(weights_tokenizer, tokenizer_meta):
        raise ValueError(
            f"the weights were trained with the {describe_tokenizer(weights_tokenizer)} tokenizer but {data} was "
            f"prepared with the {describe_tokenizer(tokenizer_meta)} one; prepare the data with the weights' "
            f"tokenizer ({weights_tokenizer.get('name')}) under another name"
        )
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the weights know {model.config.vocab_size} tokens but {data} uses {vocab_size}")
    notes = [] if weights_tokenizer is not None else [
        f"the weights do not say which tokenizer they were trained with; make sure it is "
        f"{describe_tokenizer(tokenizer_meta)}, as {data} was prepared with"]
    return model, notes


def _load_any(path: Path) -> tuple[GPT, dict | None]:
    if path.is_file():
        if path.suffix == ".safetensors":
            if (path.parent / CONFIG_FILE).is_file() and path.name == WEIGHTS_FILE:
                return _load_ours(path.parent)
            return load_hf(path.parent, weights=path)
        if path.name == HF_BIN:
            return load_hf(path.parent, weights=path)
        if path.suffix in (".pt", ".pth", ".ckpt"):
            return load_nanogpt(path)
        raise ValueError(f"{path}: expected a .safetensors, pytorch_model.bin or nanoGPT .pt file")
    if (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir():
        return _load_ours(path)
    if (path / HF_CONFIG).is_file():
        return load_hf(path)
    if (path / NANOGPT_CKPT).is_file():
        return load_nanogpt(path / NANOGPT_CKPT)
    raise FileNotFoundError(
        f"no model found in {path}: expected a Hugging Face GPT-2 directory ({HF_CONFIG} + {HF_SAFETENSORS} "
        f"or {HF_BIN}), a nanoGPT {NANOGPT_CKPT}, or one of our model directories ({CONFIG_FILE} + {WEIGHTS_FILE})"
    )


def _load_ours(path: Path) -> tuple[GPT, dict | None]:
    model, info = load_model(find_model_dir(path))
    if not isinstance(model, GPT):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a GPT")
    return model, info.get("tokenizer")


def crop_block_size(model: GPT, block_size: int) -> None:
    """Shorten the model's context to ``block_size`` by keeping the first position embeddings."""
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"block_size must be in [1, {model.config.block_size}] to crop, got {block_size}")
    model.config = dataclasses.replace(model.config, block_size=block_size)
    if model.config.rope:  # the angles of the first positions are the same: nothing to cut
        return
    model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:block_size].clone())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptforge.gpt.pretrained",
                                description="Convert weights between formats.")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a model as a Hugging Face GPT-2 directory")
    export.add_argument("--out_dir", required=True,
                        help="a training run's output folder or model directory (or anything load_pretrained takes)")
    export.add_argument("--to", required=True, help="the directory to write config.json and model.safetensors into")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --to, whole (never merged with its files)")
    args = p.parse_args(argv)
    try:
        with FolderLock(args.to, "export"):
            check_replaceable(args.to, args.overwrite, EXPORT_DIR_FILES, "an export")
            model, tokenizer_meta = load_pretrained(args.out_dir)
            with staged_folder(args.to) as staging:  # the whole folder, swapped in when complete
                export_hf(model, staging, tokenizer_meta)
            directory = Path(args.to)
    except (FileNotFoundError, ValueError, FolderBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full disk
        print(f"error: cannot write into {args.to}: {err.strerror or err}", file=sys.stderr)
        return 2
    tokenizer_files = [n for n in HF_TOKENIZER_FILES if (directory / n).is_file()]
    written = ", ".join(str(directory / n) for n in (HF_CONFIG, *tokenizer_files))
    print(f"wrote {written} and {directory / HF_SAFETENSORS} ({model.num_params() / 1e6:.2f}M params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
