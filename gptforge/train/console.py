"""What a run prints, for a person or for a file: a progress bar at a terminal; elsewhere
(``> run.log``, a batch job, a CI log) no bar, whose every repaint would be a line of the file,
but plain log lines that each start with the time and say the ETA (``--progress`` forces
either way)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

Log = Callable[[str], None]


def wants_progress_bar(setting: str, streams: tuple[TextIO, ...] | None = None) -> bool:
    """``--progress``: "true", "false", or "auto": a bar when stdout (the log lines) and stderr
    (tqdm's bar) are both terminals."""
    if setting != "auto":
        return setting == "true"
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return all(_is_terminal(s) for s in streams)


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd replacement stream
        return False


def timestamped(log: Log) -> Log:
    """``log`` with each line prefixed by the local time (``2026-12-05 12:00:01``); already so: as is."""
    if getattr(log, "timestamped", False):
        return log

    def write(line: str) -> None:
        log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")

    write.timestamped = True
    return write


def eta_seconds(started: float, start_step: int, step: int, max_iters: int) -> float | None:
    """Seconds left to ``max_iters`` at the pace since ``started`` (``perf_counter``, at
    ``start_step``), evaluations and checkpoints included: the wall time a user waits."""
    done = step - start_step
    if done <= 0:
        return None
    return (time.perf_counter() - started) / done * (max_iters - step)
