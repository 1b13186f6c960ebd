"""Weights from elsewhere: OpenAI's GPT-2 (Hugging Face layout), nanoGPT checkpoints, and
export of our models to the Hugging Face GPT-2 layout.

    model, tokenizer_meta = load_pretrained("gpt2")            # or gpt2-medium/-large/-xl
    model, tokenizer_meta = load_pretrained("path/to/hf_dir")  # config.json + model.safetensors
    model, tokenizer_meta = load_pretrained("out/ckpt.pt")     # nanoGPT
    export_hf(model, "hf_dir", tokenizer_meta)                  # transformers can load it

    python -m gptforge.gpt.pretrained export --out_dir RUN --to DIR

Nothing is downloaded: the GPT-2 names resolve to local directories (``$GPT_MODELS_DIR/<name>``
or the Hugging Face cache). Our parameter names are GPT-2's, so the mapping is one to one,
except that GPT-2 stores its Linear layers as ``Conv1D`` with the weight transposed
(in, out), and ties ``lm_head`` to ``wte`` (files often leave it out). A model whose tokenizer
was trained on the user's corpus (gptforge/gpt/tokenizer_training.py) is exported with that tokenizer
(tokenizer.json + tokenizer_config.json), which ``transformers.AutoTokenizer`` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.io import CONFIG_FILE, WEIGHTS_FILE, find_model_dir, load_model
from gptforge.gpt.model import GPT, unwrap
from gptforge.gpt.tokenizer import (
    EOT_TEXT,
    GPT2_EOT_TOKEN,
    GPT2_VOCAB_SIZE,
    TRAINED_TOKENIZERS,
    TokenizerUnavailableError,
    describe_tokenizer,
    same_tokenizer,
    tokenizer_from_meta,
)

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # sharded: model-00001-of-0000N.safetensors ...
HF_BIN = "pytorch_model.bin"
NANOGPT_CKPT = "ckpt.pt"
# the Linear layers GPT-2 stores as Conv1D, with the weight as (in_features, out_features)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the GPT-2 BPE, as GPT2Tokenizer().to_meta() describes it (written out: loading weights needs no tiktoken)
GPT2_TOKENIZER_META = {"name": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "encoding": "gpt2"}
TOKENIZER_KEY = "gpt_tokenizer"  # our tokenizer meta, kept in an exported config.json
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # the last: older versions


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
            return _load_hf(path.parent, weights=path)
        if path.name == HF_BIN:
            return _load_hf(path.parent, weights=path)
        if path.suffix in (".pt", ".pth", ".ckpt"):
            return load_nanogpt(path)
        raise ValueError(f"{path}: expected a .safetensors, pytorch_model.bin or nanoGPT .pt file")
    if (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir():
        return _load_ours(path)
    if (path / HF_CONFIG).is_file():
        return _load_hf(path)
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


# ----------------------------------------------------------------------------------------------
# OpenAI GPT-2 in the Hugging Face layout
# ----------------------------------------------------------------------------------------------


def find_gpt2(name: str) -> Path:
    """The local folder holding GPT-2 ``name``'s config.json and weights, or a FileNotFoundError
    that says where to get them. Looks in ``$GPT_MODELS_DIR/<name>``, then the Hugging Face
    cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    candidates = []
    if os.environ.get("GPT_MODELS_DIR"):
        candidates.append(Path(os.environ["GPT_MODELS_DIR"]).expanduser() / name)
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    for repo in (f"openai-community--{name}", name):  # the repo id, and its older alias without owner
        snapshots = Path(hub).expanduser() / f"models--{repo}" / "snapshots"
        candidates += sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        if (folder / HF_CONFIG).is_file() and any(
            (folder / f).is_file() for f in (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_BIN)
        ):
            return folder
    models_dir = os.environ.get("GPT_MODELS_DIR")
    places = f"{Path(models_dir).expanduser() / name}" if models_dir else "$GPT_MODELS_DIR (not set)"
    places += f" and the Hugging Face cache {Path(hub).expanduser()}"
    raise FileNotFoundError(
        f"GPT-2 weights {name!r} are not on this machine (looked in {places}), and nothing is downloaded here. "
        f"Get {HF_CONFIG} and {HF_SAFETENSORS} from the Hugging Face repo openai-community/{name} "
        f"(https://huggingface.co/openai-community/{name}), e.g. with `hf download openai-community/{name} "
        f"{HF_CONFIG} {HF_SAFETENSORS} --local-dir MODELS/{name}`, then set GPT_MODELS_DIR=MODELS "
        f"(or pass the folder's path instead of {name!r})."
    )


def _read_hf_weights(directory: Path, weights: Path | None) -> dict[str, torch.Tensor]:
    if weights is None:
        for name in (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_BIN):
            if (directory / name).is_file():
                weights = directory / name
                break
        else:
            raise FileNotFoundError(
                f"{directory} has {HF_CONFIG} but no weights: expected {HF_SAFETENSORS} "
                f"(or {HF_SAFETENSORS_INDEX} with its shards, or {HF_BIN})"
            )
    if weights.name == HF_SAFETENSORS_INDEX:
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in safetensors.torch.load_file(directory / shard).items()}
    if weights.suffix == ".safetensors":
        return safetensors.torch.load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def _config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """Our config for a Hugging Face GPT2Config dict; refuses the variants our model does not compute."""
    expected = dict(
        activation_function=(*HF_ACTIVATIONS, "gelu_pytorch_tanh"),  # the last, GELU's tanh form too
        layer_norm_epsilon=(1e-5,),
        scale_attn_weights=(True,),
        scale_attn_by_inverse_layer_idx=(False,),
        add_cross_attention=(False,),
        tie_word_embeddings=(True,),
        n_inner=(None, 4 * hf.get("n_embd", 768)),
    )
    for key, allowed in expected.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported here (supported: {list(allowed)})")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf['model_type']!r}; only GPT-2 ('gpt2') weights load here")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
        dropout=hf.get("resid_pdrop", 0.1),
        bias=True,
        activation="gelu" if hf.get("activation_function") == "gelu" else "gelu_tanh",
    )


def _config_from_tensors(sd: dict[str, torch.Tensor]) -> GPTConfig:
    """Shape from the tensors alone; the head count is not in them, GPT-2's heads are 64 wide."""
    vocab_size, n_embd = sd["wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    return GPTConfig(vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0], n_layer=n_layer,
                     n_head=max(1, n_embd // 64), n_embd=n_embd, dropout=0.0, bias=True)


def _load_hf(directory: Path, weights: Path | None = None) -> tuple[GPT, dict | None]:
    sd = _read_hf_weights(directory, weights)
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (OpenAI's files) "h.0..."
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    hf = json.loads((directory / HF_CONFIG).read_text()) if (directory / HF_CONFIG).is_file() else None
    config = _config_from_hf(hf, directory / HF_CONFIG) if hf is not None else _config_from_tensors(sd)
    lm_head = sd.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, sd["wte.weight"]):
        raise ValueError(f"{directory}: lm_head.weight differs from wte.weight; only tied GPT-2 weights load here")
    ours = {}
    for key, value in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old files keep the causal mask as a buffer; we have none
        ours["transformer." + key] = value.t() if key.endswith(CONV1D) else value
    model = _build(config, ours, source=directory)
    meta = (hf or {}).get(TOKENIZER_KEY) or dict(GPT2_TOKENIZER_META)
    return model, meta


def _build(config: GPTConfig, state_dict: dict[str, torch.Tensor], source: Path) -> GPT:
    """A GPT of ``config`` holding ``state_dict`` (our names, lm_head left out): built on the
    meta device (no random init of a model about to be overwritten), weights then assigned."""
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: p.shape for k, p in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        shapes = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(expected[k])}" for k in wrong[:5]]
        raise ValueError(
            f"{source}: the weights do not fit a GPT of {config}; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes}"
        )
    tensors = {k: v.to(torch.float32).contiguous() for k, v in state_dict.items()}  # fp32 master weights
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # tie again: assign replaced the Parameter objects
    return model


def crop_block_size(model: GPT, block_size: int) -> None:
    """Shorten the model's context to ``block_size`` by keeping the first position embeddings."""
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"block_size must be in [1, {model.config.block_size}] to crop, got {block_size}")
    model.config = dataclasses.replace(model.config, block_size=block_size)
    if model.config.rope:  # the angles of the first positions are the same: nothing to cut
        return
    model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:block_size].clone())


# ----------------------------------------------------------------------------------------------
# nanoGPT checkpoints
# ----------------------------------------------------------------------------------------------


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
    model = _build(config, sd, source=path)
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


# ----------------------------------------------------------------------------------------------
# Export to the Hugging Face GPT-2 layout
# ----------------------------------------------------------------------------------------------


# the architecture options GPT-2's layout has no place for, with GPT-2's values
GPT2_ONLY = dict(rope=False, qk_norm=False, tie_embeddings=True)
# our activations that transformers' GPT-2 computes too, by its names (gelu_new: the tanh form)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu": "gelu"}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptforge.gpt.pretrained", description="Convert weights between formats.")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a model as a Hugging Face GPT-2 directory")
    export.add_argument("--out_dir", required=True,
                        help="a training run's output folder or model directory (or anything load_pretrained takes)")
    export.add_argument("--to", required=True, help="the directory to write config.json and model.safetensors into")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --to")
    args = p.parse_args(argv)
    try:
        to = Path(args.to)
        if to.exists() and not to.is_dir():
            raise ValueError(f"--to {to} exists and is not a folder")
        earlier = [n for n in (HF_CONFIG, HF_SAFETENSORS, *HF_TOKENIZER_FILES) if (to / n).exists()]
        if earlier and not args.overwrite:
            raise ValueError(f"--to {to} already holds {' and '.join(earlier)}; pass --overwrite to replace them")
        model, tokenizer_meta = load_pretrained(args.out_dir)
        directory = export_hf(model, to, tokenizer_meta)
    except (FileNotFoundError, ValueError) as err:
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
