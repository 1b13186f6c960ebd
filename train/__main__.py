"""``python -m train [--config FILE] [--key=value ...]``: train a GPT (see train/config.py).

Distributed: ``torchrun --nproc_per_node=N -m train ...`` or ``deepspeed --num_gpus N --module train
--strategy=deepspeed ...`` (see train/strategy.py and train/slurm/)."""

from __future__ import annotations

import os
import sys

from gpt.tokenizer import TokenizerUnavailableError
from kernels import BackendError
from train.checkpoint import CheckpointError
from train.config import ConfigError, describe, load_config, parse_args
from train.data import DataError
from train.loop import train

# Errors whose message is meant for the user: printed as one line, no traceback.
USER_ERRORS = (ConfigError, BackendError, DataError, CheckpointError, TokenizerUnavailableError, FileNotFoundError)

USAGE = """usage: python -m train [--config FILE] [--key=value ...]

Trains a GPT; every key below can be set in a TOML file (--config) or on the command line.
Presets live in train/configs/. Keys and defaults:
"""


def drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``; LOCAL_RANK in the environment says the same."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = drop_local_rank(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + describe())
        return 0
    try:
        cfg = load_config(*parse_args(argv))
        train(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("GPT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
