"""Distributed Checkpoint (DCP) shards, as ``--strategy=fsdp`` writes them into a checkpoint's
``dcp/`` folder (``checkpoint.DCP_DIR``): the optimizer state read from them into a plain,
unsharded model (``single`` and ``ddp`` resuming an fsdp run), and DCP's errors in one line.
Writing them, and reading them back under FSDP: gptforge/train/fsdp.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from gptforge.train.checkpoint import DCP_DIR, CheckpointError


def load_optimizer_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load the optimizer state of an fsdp checkpoint's ``directory/dcp`` into a plain (unsharded)
    model's optimizer: each rank reads every shard (``single`` and ``ddp`` resuming an fsdp run)."""
    try:
        state = get_optimizer_state_dict(model, optimizer)
        dcp.load(dict(optimizer=state), checkpoint_id=directory / DCP_DIR)
        set_optimizer_state_dict(model, optimizer, state)
    except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"its optimizer state cannot be loaded from {DCP_DIR}/ ({first_cause(err)})") from None


def first_cause(err: BaseException) -> str:
    """One line for an error; for DCP's CheckpointException (every rank's failure with its
    traceback), the first rank's exception."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = next(iter(err.failures.items()))
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
