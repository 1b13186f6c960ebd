"""The rehearsal's planted faults: they prove the suite survives what a real run may meet.

- ``overrun`` records a figure, starts a grandchild process, then ignores SIGTERM and its own
  deadline and sleeps: the suite must kill its whole process group at the end of its share,
  keep the figure, and go on to the next stage.
- ``crash`` records a figure and raises: the suite must report the crash, keep the figure and
  go on.

They run only with ``gpu_suite.py --rehearse``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from benchmarks.suite.stage import Stage


def run_overrun(stage: Stage) -> None:
    stage.watch_deadline = False  # only the suite's kill may end this stage (orphan check stays)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    stage.figure("planted faults", "before the overrun", 1.0, "figure", pids=[os.getpid(), child.pid],
                 note="recorded before the stage overran its share")  # fmt: skip
    while True:
        time.sleep(1)


def run_crash(stage: Stage) -> None:
    stage.figure("planted faults", "before the crash", 1.0, "figure", note="recorded before the stage crashed")
    raise RuntimeError("planted crash: the suite must report it and go on")
