"""``python -m gptforge.train [--config FILE] [--key=value ...]``: train a GPT (see gptforge/train/config.py).

Distributed: ``torchrun --nproc_per_node=N -m gptforge.train ...`` or ``deepspeed --num_gpus N --module gptforge.train
--strategy=deepspeed ...`` (see gptforge/train/strategy.py and gptforge/train/slurm/).

Exit codes: 0 done; 2 a user error (one line on stderr); 75 stopped by SIGTERM/SIGINT after writing
a checkpoint (run again with --resume); 3 a NaN/inf loss under --nan_policy=stop (see gptforge/train/faults.py)."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the speedrun's clock starts with the command

import os  # noqa: E402
import sys  # noqa: E402

from gptforge.train.config import ConfigError, describe, load_config, parse_args  # noqa: E402
from gptforge.train.faults import TrainingStopped  # noqa: E402

USAGE = """usage: python -m gptforge.train [--config FILE] [--key=value ...]

Trains a GPT; every key below can be set in a TOML file (--config) or on the command line.
Presets live in gptforge/train/configs/. Keys and defaults:
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
        # torch, the model and the loop only now: --help and a bad flag answer without them
        from gptforge.train.stages import train

        result = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0 and "val_loss" in result:
            accuracy = f", held-out accuracy {100 * result['accuracy']:.1f}%" if "accuracy" in result else ""
            print(f"done: val loss {result['val_loss']:.4f}{accuracy} at step {result['step']}, "
                  f"{time.perf_counter() - STARTED:.1f} s after the command started")
    except TrainingStopped as stop:  # a stop signal, or a NaN under --nan_policy=stop: checkpointed
        if stop.announce:
            print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err) or os.environ.get("GPT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def is_user_error(err: Exception) -> bool:
    """Whether ``err``'s message is for the user (one line, no traceback): a ConfigError, or
    once the loop is imported, any of train.loop.USER_ERRORS."""
    loop = sys.modules.get("gptforge.train.loop")
    return isinstance(err, ConfigError) or loop is not None and isinstance(err, loop.USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
