"""Our GPT written as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
transformers loads, and a tokenizer trained on the user's corpus as transformers' fast tokenizer
(tokenizer.json + tokenizer_config.json, for ``AutoTokenizer``). Only GPT-2's architecture fits
the layout. The command line: ``python -m gptforge.gpt.pretrained export``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from gptforge.gpt.hf_import import CONV1D, HF_ACTIVATIONS, HF_CONFIG, HF_SAFETENSORS, TOKENIZER_KEY
from gptforge.gpt.model import GPT, unwrap
from gptforge.gpt.tokenizer import GPT2_EOT_TOKEN, tokenizer_from_meta
from gptforge.gpt.tokenizer_base import EOT_TEXT, TokenizerUnavailableError
from gptforge.gpt.trained_tokenizers import TRAINED_TOKENIZERS

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # the last: older versions
# what a GPT-2 folder may hold (ours, or one from the Hub): an export replaces only such a folder
EXPORT_DIR_FILES = (HF_CONFIG, HF_SAFETENSORS, *HF_TOKENIZER_FILES, "generation_config.json", "pytorch_model.bin",
                    "vocab.json", "merges.txt")
# the architecture options GPT-2's layout has no place for, with GPT-2's values
GPT2_ONLY = dict(rope=False, qk_norm=False, tie_embeddings=True)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def export_hf(
    model: torch.nn.Module,
    directory: str | Path,
    tokenizer_meta: dict | None = None,
    warn: Callable[[str], None] = _to_stderr,
) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
    ``transformers.GPT2LMHeadModel.from_pretrained`` loads. A model without biases gets zero
    biases (the same function). Our tokenizer meta is kept in config.json for ``load_pretrained``.
    A tokenizer trained on the user's corpus is written too, for ``AutoTokenizer.from_pretrained``
    (see ``export_hf_tokenizer``); without transformers installed that is skipped, said through
    ``warn``. GPT-2's own tokenizer is not written: transformers users take openai-community/gpt2's."""
    model = unwrap(model)
    if not isinstance(model, GPT):
        raise ValueError(f"only a GPT exports to the GPT-2 layout, got {type(model).__name__}")
    c = model.config
    different = {k: getattr(c, k) for k in GPT2_ONLY if getattr(c, k) != GPT2_ONLY[k]}
    if c.activation not in HF_ACTIVATIONS.values():
        different["activation"] = c.activation
    if different:
        raise ValueError("only GPT-2's architecture exports to its layout; this model has "
                         + ", ".join(f"{k}={v}" for k, v in different.items()) + f" (GPT-2: {GPT2_ONLY})")
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; transformers ties it again
        value = value.detach().to("cpu", torch.float32)
        tensors[key] = (value.t() if key.endswith(CONV1D) else value).contiguous()
    if not c.bias:  # GPT-2 always has biases: zeros compute the same
        for key in [k for k in tensors if k.endswith(".weight") and "wte" not in k and "wpe" not in k]:
            width = tensors[key].shape[-1] if key.endswith(CONV1D) else tensors[key].shape[0]
            tensors.setdefault(key.removesuffix(".weight") + ".bias", torch.zeros(width))
    gpt2_vocab = c.vocab_size > GPT2_EOT_TOKEN
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": {ours: hf for hf, ours in HF_ACTIVATIONS.items()}[c.activation],
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # older transformers versions read this name
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": GPT2_EOT_TOKEN if gpt2_vocab else None,
        "eos_token_id": GPT2_EOT_TOKEN if gpt2_vocab else None,
        "dtype": "float32",
    }
    trained_tokenizer = tokenizer_meta is not None and tokenizer_meta.get("name") in TRAINED_TOKENIZERS
    if trained_tokenizer:  # its <|endoftext|> ends a generation, as GPT-2's does
        hf_config["bos_token_id"] = hf_config["eos_token_id"] = tokenizer_meta.get("eot_id")
    if tokenizer_meta is not None:
        hf_config[TOKENIZER_KEY] = tokenizer_meta
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(directory / HF_SAFETENSORS), metadata={"format": "pt"})
    (directory / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    if trained_tokenizer:
        try:
            export_hf_tokenizer(tokenizer_meta, directory, model_max_length=c.block_size)
        except TokenizerUnavailableError as err:
            warn(f"note: the tokenizer was not exported ({err}); the weights were, and config.json keeps the "
                 f"tokenizer under {TOKENIZER_KEY!r}. Install that and export again for AutoTokenizer to load it")
    return directory


def export_hf_tokenizer(tokenizer_meta: dict, directory: str | Path, model_max_length: int | None = None) -> list[Path]:
    """Write a trained tokenizer (sentencepiece or bpe meta) as transformers saves a fast tokenizer
    (tokenizer.json + tokenizer_config.json), with ``<|endoftext|>`` as its bos and eos token, so
    ``AutoTokenizer.from_pretrained(directory)`` loads it; return the files written.

    It encodes text to our ids, with two known differences: ``<|endoftext|>`` written in the text
    is the special token there (transformers' usual way; ours keeps it plain text), and a
    sentencepiece unigram model may choose another of two segmentations of equal score (runs of
    spaces), where SentencePiece's float32 sums and transformers' float64 ones round differently.
    A TokenizerUnavailableError if transformers is not installed."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise TokenizerUnavailableError("transformers is not installed: pip install transformers") from None
    tokenizer = tokenizer_from_meta(tokenizer_meta)
    if not hasattr(tokenizer, "to_hf_tokenizer"):
        raise ValueError(f"only a trained tokenizer ({', '.join(TRAINED_TOKENIZERS)}) exports, got {tokenizer.name}")
    options = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.to_hf_tokenizer(),
        bos_token=EOT_TEXT,
        eos_token=EOT_TEXT,
        clean_up_tokenization_spaces=False,  # decode must give back the text, spaces before punctuation too
        **options,
    )
    return [Path(f) for f in fast.save_pretrained(str(directory))]
