"""Saving and loading a model on its own: weights in safetensors, shape and tokenizer in JSON.

A model directory holds ``model.safetensors`` and ``model.json``; training checkpoints
(``gptforge/train/checkpoint.py``) are model directories with the training state beside them, and a
``manifest.json`` with the sha256 of every file, which ``find_model_dir`` checks before it
hands a checkpoint to anyone (sampling from a damaged checkpoint would be silently wrong).
``build_gpt`` builds a GPT around weights read from elsewhere (gptforge/gpt/pretrained.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT, build_model, unwrap

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
MANIFEST = "manifest.json"  # written last into a checkpoint: sha256 of every other file


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer_meta: dict | None = None) -> None:
    """Write the weights and a JSON with the model config and tokenizer (no fsync; callers
    that need durability, like checkpoints, write into a temporary directory and rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)  # a compiled model's state_dict keys start with "_orig_mod."
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))  # handles the tied lm_head
    info = dict(config=model.config.to_dict(), tokenizer=tokenizer_meta)
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: Path, only: tuple[str, ...] | None = None) -> str | None:
    """None if the checkpoint's files (or those of them named in ``only``) match its manifest,
    else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (an interrupted write?)"
    try:
        expected = json.loads(manifest_path.read_text())["files"]
        items = list(expected.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return "manifest is unreadable"
    for name, digest in items:
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digest:
            return f"{name} does not match its sha256 in the manifest (truncated or corrupted)"
    return None


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def find_model_dir(path: str | Path, warn: Callable[[str], None] = _to_stderr) -> Path:
    """``path`` itself if it holds a model, else the newest ``checkpoints/step_*`` under it (a
    training run's output folder) whose model files match its manifest; damaged newer ones are
    reported through ``warn`` and skipped. A model directory with a manifest must match it too.
    Only the model's files are hashed: the optimizer state can be many times larger."""
    path = Path(path)
    model_files = (WEIGHTS_FILE, CONFIG_FILE)
    if (path / WEIGHTS_FILE).is_file():
        if (path / MANIFEST).is_file() and (problem := verify(path, only=model_files)):
            raise ValueError(f"{path} is damaged: {problem}")
        return path
    steps = sorted((path / "checkpoints").glob("step_*"), key=lambda p: p.name)
    steps = [p for p in steps if (p / WEIGHTS_FILE).is_file()]
    if not steps:
        raise FileNotFoundError(f"no model in {path}: expected {WEIGHTS_FILE} or checkpoints/step_*/ (train first)")
    problems = []
    for step in reversed(steps):
        problem = verify(step, only=model_files)
        if problem is None:
            return step
        problems.append(f"{step.name}: {problem}")
        warn(f"checkpoint {step} is unusable ({problem}); trying the previous one")
    raise ValueError(f"no usable checkpoint in {path / 'checkpoints'}: {'; '.join(problems)}")


def read_info(directory: str | Path) -> dict:
    """A model directory's model.json: ``config`` (a GPTConfig's fields) and ``tokenizer``."""
    path = Path(directory) / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
        GPTConfig.from_dict(info["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid model description: {err}") from err
    return info


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the model described in ``model.json`` and load its weights; returns (model, info)."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model directory: {name} is missing")
    info = read_info(directory)
    model = build_model(GPTConfig.from_dict(info["config"]))
    safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), device=str(device))
    return model.to(device), info


def build_gpt(config: GPTConfig, state_dict: dict[str, torch.Tensor], source: Path) -> GPT:
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
