"""nanoGPT checkpoints (``ckpt.pt``) read into our GPT, with the tokenizer they were trained on:
GPT-2's BPE, or the characters of a ``meta.pkl`` beside them (read as plain data only).
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.io import build_gpt
from gptforge.gpt.model import GPT
from gptforge.gpt.tokenizer import GPT2_TOKENIZER_META, GPT2_VOCAB_SIZE

NANOGPT_CKPT = "ckpt.pt"


def load_nanogpt(path: str | Path) -> tuple[GPT, dict | None]:
    """A nanoGPT ``ckpt.pt``: {'model': state_dict, 'model_args': {...}, ...}, read with
    ``weights_only=True``. Keys of a torch.compile'd model start with '_orig_mod.'."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a nanoGPT checkpoint: expected a dict with 'model' and 'model_args', got {keys}"
        )
    args = dict(ckpt["model_args"])
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    # nanoGPT's MLP uses the exact GELU (nn.GELU()), not GPT-2's tanh form
    config = GPTConfig(**{"activation": "gelu", **{k: v for k, v in args.items() if k in known}})
    sd = {}
    for key, value in ckpt["model"].items():
        key = key.removeprefix("_orig_mod.")
        if key == "lm_head.weight" or key.endswith(".attn.bias") and value.dim() == 4:
            continue  # tied to wte; the causal-mask buffer of nanoGPT without flash attention
        sd[key] = value
    model = build_gpt(config, sd, source=path)
    return model, _nanogpt_tokenizer(path, ckpt, config.vocab_size)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain data (dicts, lists, strings, numbers) and nothing else."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")


def _nanogpt_tokenizer(path: Path, ckpt: dict, vocab_size: int) -> dict | None:
    """nanoGPT trains on GPT-2 BPE unless its data folder has a meta.pkl (character level)."""
    dataset = (ckpt.get("config") or {}).get("dataset")
    candidates = [path.parent / "meta.pkl"] + ([Path("data") / str(dataset) / "meta.pkl"] if dataset else [])
    for meta_path in candidates:
        if meta_path.is_file():
            with open(meta_path, "rb") as f:
                meta = _DataOnlyUnpickler(f).load()
            itos = meta.get("itos") if isinstance(meta, dict) else None
            if isinstance(itos, dict) and all(isinstance(c, str) and len(c) == 1 for c in itos.values()):
                chars = "".join(itos[i] for i in sorted(itos))
                return {"name": "char", "vocab_size": len(chars), "chars": chars}
    return dict(GPT2_TOKENIZER_META) if vocab_size >= GPT2_VOCAB_SIZE else None

