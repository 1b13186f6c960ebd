"""Surviving faults: preemption signals, a lock on the output folder, non-finite losses, and
the test hooks that inject faults.

    SIGTERM / SIGINT   every rank finishes its step, a checkpoint is written, exit EXIT_PREEMPTED
    out_dir/train.lock one run per output folder (O_EXCL; a dead holder on this host is stale)
    --nan_policy       stop (checkpoint the last good state, exit EXIT_NONFINITE) or skip the step;
                       never a checkpoint of non-finite weights; MAX_SKIPPED_IN_A_ROW skips stop the run

Ranks must agree on when to stop, or one rank waits forever in a collective the others left:
the trainer all-reduces one small flag tensor every step (see Trainer.train_step).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from gptforge.train.config import ConfigError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again with --resume
EXIT_NONFINITE = 3  # the loss, the gradient norm or the weights were NaN/inf (and not skipped)
# --nan_policy=skip gives up after this many non-finite steps in a row: skipping is not helping
MAX_SKIPPED_IN_A_ROW = 10
LOCK_FILE = "train.lock"


class TrainingStopped(Exception):
    """Training ended early on purpose; ``message`` is for the user, ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int, announce: bool = True):
        super().__init__(message)
        self.exit_code, self.announce = exit_code, announce  # announce: print it (rank 0 only)


class NonFiniteError(Exception):
    """A step's loss or gradient norm was not finite (raised by the trainer, before any update)."""


# --- preemption ---


class StopSignals:
    """Records SIGTERM / SIGINT instead of dying mid-step. The first signal sets ``received``;
    the default handlers are then back, so a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log=print):
        self.received: str | None = None
        self.log = log
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        self.log(f"received {self.received}: finishing this step and writing a checkpoint (send it again to abort)")
        self.uninstall()

    def install(self) -> None:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
            self._previous = {}

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


# --- one run per output folder ---


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``out_dir/train.lock``, created with O_EXCL and holding the owner's pid and host. A lock
    whose pid is dead on this host is stale (a killed run) and is taken over, saying so."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    def acquire(self, log=print) -> None:
        out_dir = self.path.parent
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"out_dir {out_dir} exists and is not a folder; choose another --out_dir") from None
        except OSError as err:
            raise ConfigError(f"cannot create out_dir {out_dir}: {err.strerror or err}") from None
        owner = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                stale = (holder and holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int)
                         and not _pid_alive(holder["pid"]))
                if not stale or attempt:
                    who = f"pid {holder['pid']} on {holder['host']}" if holder else "an unknown process"
                    raise ConfigError(
                        f"{self.path.parent} is in use by another training run ({who}, lock file {self.path}); "
                        f"wait for it, choose another --out_dir, or delete the lock file if that run is gone"
                    ) from None
                log(f"removing a stale lock {self.path}: pid {holder['pid']} on {holder['host']} is no longer running")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as err:  # a read-only filesystem, no permission
                raise ConfigError(f"cannot write into out_dir {out_dir}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as f:  # one small write right after the create
                f.write(json.dumps(owner) + "\n")
            self.held = True
            return

    def _read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# --- fault injection, for tests only ---


class FaultInjection:
    """Test hooks read from the environment (documented in tests/test_faults.py):

    GPT_FAULT_KILL_AT_STEP=k  the rank SIGKILLs itself as it starts step k (first launch only,
                              so that a torchrun restart gets past it)
    GPT_FAULT_NAN_AT_STEP=k   the loss of step k is multiplied by NaN; ``k+``: of every step from k on
    GPT_FAULT_NAN_WEIGHTS_AT_STEP=k
                              after the update of step k, a weight becomes NaN (the update of a
                              step whose loss and gradients were finite, as a too-high learning
                              rate makes it)
    GPT_FAULT_RANK=r          the rank the faults hit (default: every rank)
    """

    def __init__(self, rank: int):
        env = os.environ
        hit = env.get("GPT_FAULT_RANK", "") in ("", str(rank))
        first_launch = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.kill_at = int(env.get("GPT_FAULT_KILL_AT_STEP", "0")) if hit and first_launch else 0
        nan = env.get("GPT_FAULT_NAN_AT_STEP", "0") if hit else "0"
        self.nan_at, self.nan_onwards = int(nan.removesuffix("+")), nan.endswith("+")
        self.nan_weights_at = int(env.get("GPT_FAULT_NAN_WEIGHTS_AT_STEP", "0")) if hit else 0

    def before_step(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run, as the logs count."""
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int) -> bool:
        return step == self.nan_at or (self.nan_onwards and 0 < self.nan_at <= step)

    def poison_weights(self, step: int) -> bool:
        return step == self.nan_weights_at
