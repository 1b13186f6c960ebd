"""OpenAI's GPT-2 weights in the Hugging Face layout, read into our GPT: the layout's file names,
finding a local copy of a GPT-2 size, and ``load_hf`` (a directory of config.json +
model.safetensors, sharded safetensors or pytorch_model.bin).

Our parameter names are GPT-2's, so the mapping is one to one, except that GPT-2 stores its
Linear layers as ``Conv1D`` with the weight transposed (in, out), and ties ``lm_head`` to ``wte``
(files often leave it out). Nothing is downloaded. Export the other way: gptforge/gpt/hf_export.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.io import build_gpt
from gptforge.gpt.model import GPT
from gptforge.gpt.tokenizer import GPT2_TOKENIZER_META, GPT2_VOCAB_SIZE

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # sharded: model-00001-of-0000N.safetensors ...
HF_BIN = "pytorch_model.bin"
# the Linear layers GPT-2 stores as Conv1D, with the weight as (in_features, out_features)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKENIZER_KEY = "gpt_tokenizer"  # our tokenizer meta, kept in an exported config.json
# our activations that transformers' GPT-2 computes too, by its names (gelu_new: the tanh form)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu": "gelu"}


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


def load_hf(directory: Path, weights: Path | None = None) -> tuple[GPT, dict | None]:
    """The GPT in a Hugging Face GPT-2 ``directory`` (``weights``: one file of it, else found there),
    and its tokenizer meta: ours if an export of ours kept it in config.json, else GPT-2's."""
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
    model = build_gpt(config, ours, source=directory)
    meta = (hf or {}).get(TOKENIZER_KEY) or dict(GPT2_TOKENIZER_META)
    return model, meta

