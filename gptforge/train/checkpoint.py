"""Checkpoints: everything needed to continue a run bit for bit, written atomically.

    out_dir/checkpoints/step_0000500/
        model.safetensors  model.json   the model (gptforge/gpt/io.py), loadable on its own for sampling
        state.pt                        optimizer, grad scaler, torch/CUDA RNG states (of every rank)
        deepspeed/                      DeepSpeed's own checkpoint (--strategy=deepspeed): shards per rank
        dcp/                            --strategy=fsdp's Distributed Checkpoint shards (DCP_DIR): every rank's
        trainer.json                    step, config, numpy/python RNG states, best val loss
        manifest.json                   written last: step, sha256 of every file

A checkpoint is written into a temporary directory, each file fsynced, then renamed into
place, so a crash leaves either the old set or the new one, never half a checkpoint. Loading
checks the manifest's hashes and falls back to the previous checkpoint when one is damaged.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from gptforge.gpt.io import MANIFEST, load_model, save_model
from gptforge.gpt.io import sha256_of as _sha256
from gptforge.gpt.io import verify as verify  # the manifest's check lives in gptforge/gpt/io.py: sampling verifies too

PREFIX = "step_"
DCP_DIR = "dcp"  # an fsdp checkpoint's shards (Distributed Checkpoint), inside the checkpoint's directory


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says what was found and why it was refused."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=np.random.get_state(legacy=False),
        python=random.getstate(),
    )


def set_rng_states(tensors: dict, trainer: dict) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available() and tensors.get("cuda_rng"):
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    numpy_state = dict(trainer["numpy_rng"])
    numpy_state["state"] = dict(key=np.array(numpy_state["state"]["key"], dtype=np.uint32),
                                pos=numpy_state["state"]["pos"])
    np.random.set_state(numpy_state)
    version, state, gauss = trainer["python_rng"]
    random.setstate((version, tuple(state), gauss))


def staging_dir(out_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before ``save_checkpoint`` renames it into
    place; the same path on every rank, so that all can write their shards into it first."""
    return Path(out_dir) / "checkpoints" / f".tmp-{PREFIX}{step:07d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    config: dict,
    tokenizer_meta: dict | None,
    trainer_state: dict | None = None,
    keep_last: int = 2,
    extra_state: dict | None = None,
    staged: Path | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep_last``.

    ``extra_state`` (tensors and plain values) goes into state.pt; ``staged`` is a
    ``staging_dir`` that other writers (DeepSpeed's shards) have filled already: its files
    join the manifest and the whole directory is renamed into place.
    """
    root = Path(out_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = staged or root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if staged is None:
            shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, step, model, optimizer, scaler, config, tokenizer_meta, trainer_state, extra_state)
    except (OSError, SafetensorError, RuntimeError) as err:  # a full disk, a read-only one, ...
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(out_dir)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} into {root}: {getattr(err, 'strerror', None) or err}; "
            f"the earlier checkpoints are untouched ({kept[-1].name if kept else 'none yet'} is the newest)"
        ) from None
    if final.exists():  # the same step saved again (a resumed run): swap, never delete first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for stale in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, model, optimizer, scaler, config: dict, tokenizer_meta: dict | None,
           trainer_state: dict | None, extra_state: dict | None) -> None:
    """Every file of the checkpoint into ``tmp``, each fsynced, the manifest last."""
    save_model(model, tmp, tokenizer_meta)
    rng = rng_states()
    torch.save(
        dict(
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            torch_rng=rng["torch"],
            cuda_rng=rng["cuda"],
            **(extra_state or {}),
        ),
        tmp / "state.pt",
    )
    numpy_state = dict(rng["numpy"])  # MT19937: its key array becomes a JSON list
    numpy_state["state"] = dict(key=numpy_state["state"]["key"].tolist(), pos=int(numpy_state["state"]["pos"]))
    trainer = dict(step=step, config=config, numpy_rng=numpy_state, python_rng=rng["python"],
                   **(trainer_state or {}))
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1) + "\n")
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        _fsync(tmp / name)
    manifest = dict(step=step, files={n: _sha256(tmp / n) for n in files})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp / MANIFEST)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories under ``out_dir``, oldest first (by step)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def tidy(out_dir: str | Path, fresh: bool) -> None:
    """Before a run starts (rank 0, holding the run's lock): a fresh run removes an earlier run's
    checkpoints; temporary directories of writes that were killed go in any case."""
    for old in list_checkpoints(out_dir) if fresh else []:
        shutil.rmtree(old)
    for pattern in (".tmp-*", ".old-*"):
        for leftover in (Path(out_dir) / "checkpoints").glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def latest_valid(out_dir: str | Path, warn=print, before: Path | None = None) -> Path | None:
    """The newest checkpoint that passes ``verify`` (older than ``before``, if given); damaged
    newer ones are reported via ``warn``."""
    found = list_checkpoints(out_dir)
    if before is not None:
        found = [d for d in found if int(d.name[len(PREFIX):]) < int(before.name[len(PREFIX):])]
    for directory in reversed(found):
        problem = verify(directory)
        if problem is None:
            return directory
        warn(f"checkpoint {directory} is unusable ({problem}); trying the previous one")
    return None


@dataclass
class Resumed:
    model: torch.nn.Module
    trainer: dict
    tensors: dict  # optimizer / scaler state dicts and RNG tensors, from state.pt


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Resumed:
    """Read a checkpoint written by ``save_checkpoint`` (every ``torch.load`` is weights_only)."""
    directory = Path(directory)
    try:
        model, _ = load_model(directory, device=device)
    except torch.OutOfMemoryError:
        raise  # not the checkpoint's fault: no falling back to an older one
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {directory}: its model cannot be loaded ({err})") from None
    trainer, tensors = load_training_state(directory)
    return Resumed(model=model, trainer=trainer, tensors=tensors)


def load_training_state(directory: str | Path) -> tuple[dict, dict]:
    """trainer.json and state.pt of a checkpoint, without the model."""
    directory = Path(directory)
    try:
        # RNG states must stay on the CPU; optimizer.load_state_dict moves its state to the params
        tensors = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        # torch's own message would suggest weights_only=False, i.e. running whatever the file holds
        raise CheckpointError(f"{directory / 'state.pt'} cannot be read safely: it is not a weights-only "
                              "file (damaged, or not written by this code)") from None
    try:
        trainer = json.loads((directory / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / 'trainer.json'} cannot be read ({err})") from None
    return trainer, tensors
