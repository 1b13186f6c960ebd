"""What the training tests share: the tiny model they train, the command line or config for it,
reading a run's metrics, and launching ``python -m gptforge.train`` or torchrun as subprocesses.

Plain functions and constants, imported by name (``from tests.helpers import ...``): they take
arguments (a data folder, an out folder, overrides) and return values, so a reader sees where
each comes from; the fixtures (``data_dir``, ``one_thread``) live in conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gptforge.train.config import TrainConfig
from gptforge.train.metrics import METRICS_FILE
from gptforge.train.metrics import read_metrics as read_metrics_file

REPO = Path(__file__).resolve().parents[1]

# A model trained in seconds on the CPU: batch_size is one rank's micro-batch and
# gradient_accumulation_steps the total over all ranks (one process here: 2 micro-steps of 4).
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=2,
            learning_rate=3e-3, min_lr=3e-4, warmup_iters=3, eval_iters=2, log_interval=1, progress=False,
            num_samples=0, device="cpu", dtype="fp32")


def flags(data_dir: Path, out_dir: Path, base: dict = TINY, **overrides) -> list[str]:
    """The command line (``--key=value`` each) of ``base`` with ``overrides``, in ``data_dir`` and ``out_dir``."""
    return [f"--{k}={v}" for k, v in {**base, "data_dir": data_dir, "out_dir": out_dir, **overrides}.items()]


def config(data_dir: Path, out_dir: Path, base: dict = TINY, **overrides) -> TrainConfig:
    """The TrainConfig of ``base`` with ``overrides``, in ``data_dir`` and ``out_dir``."""
    return TrainConfig(**{**base, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides})


def read_metrics(out_dir: Path) -> list[dict]:
    """Every row of the run's metrics.jsonl, in order; a line that is no row (torn) fails the test."""
    path = out_dir / METRICS_FILE
    rows = read_metrics_file(path)
    assert len(rows) == len(path.read_text().splitlines()), f"{path} holds a line that is no JSON object"
    return rows


def logs_and_evals(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The run's training log rows (with "loss") and its evaluation rows (with "val_loss")."""
    rows = read_metrics(out_dir)
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


# --- subprocesses ---------------------------------------------------------------------------------

# one thread per process: the models are tiny, and on a busy machine a second thread that
# spins waiting for a core makes a step ten times slower (torchrun sets this for its workers)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def torchrun_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
            "-m", "gptforge.train"]


def run(cmd: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own, so that a timeout ends torchrun's workers too."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        end_session(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start(cmd: list[str]) -> subprocess.Popen:
    """A run whose output (stdout and stderr together) can be read line by line while it trains."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def end_session(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the session ``proc`` leads (nothing, when it ended well)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)[-3000:]
    raise AssertionError(f"{marker!r} never appeared:\n" + "".join(seen)[-3000:])


def files_naming_our_modules(folder: Path) -> list[str]:
    """The files under ``folder`` whose bytes name one of our modules (``gptforge.``), as a pickled
    class would. Such a file stops loading the day a module moves, so a run writes none."""
    return [str(p) for p in sorted(Path(folder).rglob("*")) if p.is_file() and b"gptforge." in p.read_bytes()]
