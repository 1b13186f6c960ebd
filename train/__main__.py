"""``python -m train [--config FILE] [--key=value ...]``: train a GPT (see train/config.py).

Distributed: ``torchrun --nproc_per_node=N -m train ...`` or ``deepspeed --num_gpus N --module train
--strategy=deepspeed ...`` (see train/strategy.py and train/slurm/).

Exit codes: 0 done; 2 a user error (one line on stderr); 75 stopped by SIGTERM/SIGINT after writing
a checkpoint (run again with --resume); 3 a NaN/inf loss under --nan_policy=stop (see train/faults.py)."""

from __future__ import annotations

import os
import sys

from train.config import describe, load_config, parse_args
from train.faults import TrainingStopped
from train.loop import USER_ERRORS, train  # errors whose message is for the user: one line, no traceback

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
    except TrainingStopped as stop:  # a stop signal, or a NaN under --nan_policy=stop: checkpointed
        if stop.announce:
            print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
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
