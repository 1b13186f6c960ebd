"""What a stage's process shares: its deadline, its recorder, and a fair timer.

The suite (benchmarks/gpu_suite.py) starts every stage as its own process, in a process group
of its own, with

    python -m benchmarks.suite.stage NAME --out DIR --deadline UNIX_TIME [--rehearse]

and kills the whole group when the stage's share of the budget is spent. The stage itself
also watches the clock (``Stage.left()``) so that it can stop between two measurements rather
than be cut in the middle of one, and a watchdog thread kills the group if the suite itself
is gone (``kill -9`` of the suite leaves no stage running on) or the deadline is long past.

Exit status: 0 when the stage ran, 3 when it ran but a parity check failed; anything else is
a crash (the traceback is in the log).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.suite import results
from benchmarks.suite.results import EXIT_CHECKS_FAILED, TUNING_FILE

# stage name -> "module:function" (imported only when that stage runs)
STAGES = {
    "card": "benchmarks.suite.card:run",
    "parity": "benchmarks.suite.parity:run",
    "attention": "benchmarks.suite.kernel_bench:run_attention",
    "layer_norm": "benchmarks.suite.kernel_bench:run_layer_norm",
    "train": "benchmarks.suite.model:run_train",
    "generate": "benchmarks.suite.model:run_generate",
    "overrun": "benchmarks.suite.planted:run_overrun",
    "crash": "benchmarks.suite.planted:run_crash",
}
REPO = Path(__file__).resolve().parents[2]
# Under the suite each autotuned kernel tries this many configs, each timed for about this long.
TUNING_CANDIDATES, TUNING_BENCH_MS = 2, 25
# The watchdog kills the stage's group this long after its deadline, if the suite has not.
WATCHDOG_GRACE_S = 5.0


class Stage:
    """One stage's run: where figures go, how long is left, how to time fairly."""

    def __init__(self, name: str, out: Path, deadline: float, rehearse: bool) -> None:
        self.name, self.out, self.deadline, self.rehearse = name, out, deadline, rehearse
        self.cuda = torch.cuda.is_available() and not rehearse
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.device_name = torch.cuda.get_device_name() if self.cuda else _cpu_name()
        self.versions = versions()
        self.failed_checks = 0
        self.watch_deadline = True  # the planted overrun turns this off to test the suite's kill
        self._recorded_winners: set[tuple] = set()

    # -- time ------------------------------------------------------------------------------

    def left(self) -> float:
        """Seconds until this stage's deadline."""
        return self.deadline - time.time()

    # -- recording ---------------------------------------------------------------------------

    def _append(self, kind: str, **fields) -> None:
        record = dict(kind=kind, stage=self.name, device=self.device_name, versions=self.versions,
                      rehearsal=self.rehearse, **fields)  # fmt: skip
        results.append(self.out / results.RESULTS_FILE, record)

    def figure(self, group: str, name: str, value: float, unit: str, **fields) -> None:
        """Record one measured value now (see results.py for the optional fields)."""
        self._append("figure", group=group, name=name, value=float(value), unit=unit, **fields)
        note = f"  {fields['note']}" if fields.get("note") else ""
        print(f"[{self.name}] {group} | {name}: {results.format_number(value)} {unit}{note}", flush=True)

    def check(self, group: str, name: str, error: float, tolerance: float, note: str = "") -> bool:
        """Record one parity case; NaN never passes."""
        passed = math.isfinite(error) and error <= tolerance
        self.failed_checks += not passed
        self._append("check", group=group, name=name, value=float(error), unit="max rel error",
                     tolerance=tolerance, passed=passed, note=note)  # fmt: skip
        print(f"[{self.name}] {group} | {name}: error {error:.2e} (tolerance {tolerance:.0e}) "
              f"{'ok' if passed else 'FAILED'} {note}".rstrip(), flush=True)  # fmt: skip
        return passed

    def note(self, group: str, name: str, text: str) -> None:
        """A row that has no figure, with one line saying why (a missing package, no time)."""
        self._append("note", group=group, name=name, note=text)
        print(f"[{self.name}] {group} | {name}: {text}", flush=True)

    def flash_attn_installed(self) -> bool:
        """Whether Dao-AILab's flash_attn can be imported here (found, not imported: it is slow)."""
        try:
            return importlib.util.find_spec("flash_attn") is not None
        except ImportError:
            return False

    def ceiling(self, which: str) -> float | None:
        """A ceiling the card stage measured in this run ("copy" in GB/s, "matmul" in TFLOP/s)."""
        records, _ = results.read(self.out / results.RESULTS_FILE)
        found = [r["value"] for r in records if r.get("kind") == "figure" and r.get("ceiling") == which]
        return found[-1] if found else None

    # -- autotuning ---------------------------------------------------------------------------

    def start_tuning(self) -> None:
        """Short candidate lists, and the winners a previous run on this machine saved."""
        from gptforge.kernels.triton import tuning

        tuning.limit_candidates(TUNING_CANDIDATES, TUNING_BENCH_MS)
        path = self.out / TUNING_FILE
        committed = REPO / "benchmarks" / "results" / f"{results.slug(self.device_name)}-{TUNING_FILE}"
        if not path.is_file() and committed.is_file() and not self.rehearse:
            path = committed  # an earlier session's winners on this card, committed with its results
        _, message = tuning.load(path, self.device_name)
        print(f"[{self.name}] autotune: {TUNING_CANDIDATES} candidates per kernel; {message}", flush=True)

    def record_tuning(self) -> None:
        """Record every config this process's autotuner picked, and save all winners (these and
        the loaded ones) for the next run."""
        from gptforge.kernels.triton import tuning

        for w in tuning.winners(tuned_here=True):
            ident = (w["kernel"], tuple(w["key"]))
            if ident in self._recorded_winners:
                continue
            self._recorded_winners.add(ident)
            names = w["key_names"]
            key = ", ".join(f"{n.removesuffix('_KEY')}={v}" for n, v in zip(names, w["key"], strict=False))
            key += f", {str(w['key'][len(names)]).removeprefix('torch.')}" if len(w["key"]) > len(names) else ""
            timings = w["timings_ms"]
            others = ", ".join(f"{k} {f'{v:.3g} ms' if v is not None else 'failed'}"
                               for k, v in timings.items() if k != w["label"])  # fmt: skip
            self.figure("autotune winners", f"{w['kernel']} {key}", timings.get(w["label"]) or 0.0, "ms",
                        key=w["key"], config=w["config"], note=f"{w['label']} won over {others}")  # fmt: skip
        tuning.save(self.out / TUNING_FILE, self.device_name)

    # -- timing --------------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds_per_call(self, fn: Callable[[], object]) -> float:
        """Median seconds of one call: on a GPU ``triton.testing.do_bench`` (events, L2 flushed
        between calls); in the rehearsal one call on the host clock (its figures say nothing)."""
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=5, rep=40, return_mode="median") / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def rounds(self, count: int) -> int:
        """``count`` timing rounds on a GPU; two in the rehearsal, where figures say nothing."""
        return 2 if self.rehearse else count

    def interleaved(self, fns: dict[str, Callable[[], object]], rounds: int,
                    timer: Callable | None = None) -> dict[str, tuple[float, float, float]]:  # fmt: skip
        """Seconds per call of every fn as (median, fastest, slowest) over ``rounds`` rounds; each
        round times every fn once, in an order rotated round by round, so no fn always runs first
        or last. Warm the fns up (compile, tune) before calling this."""
        timer = timer or self.seconds_per_call
        names = list(fns)
        if not names:  # every candidate failed its warm-up (each has its note)
            return {}
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n].append(timer(fns[n]))
        return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}

    # -- the watchdog -----------------------------------------------------------------------------

    def start_watchdog(self) -> None:
        parent = os.getppid()

        def watch() -> None:
            while True:
                time.sleep(0.25)
                orphaned = os.getppid() != parent
                overdue = self.watch_deadline and time.time() > self.deadline + WATCHDOG_GRACE_S
                if orphaned or overdue:
                    with contextlib.suppress(OSError):  # with the suite gone, stdout is a broken pipe
                        why = "the suite is gone" if orphaned else "the deadline is long past"
                        print(f"[{self.name}] watchdog: {why}; killing this stage's process group", flush=True)
                    os.killpg(os.getpgrp(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True, name="stage-watchdog").start()


def versions() -> dict[str, str]:
    found = dict(python=platform.python_version(), torch=torch.__version__)
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["cudnn"] = str(torch.backends.cudnn.version())
    for name in ("triton", "flash_attn", "deepspeed"):
        try:  # find it without importing it (deepspeed's import alone takes seconds)
            found[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else "not installed"
        except (ImportError, importlib.metadata.PackageNotFoundError):
            found[name] = "not installed"
    return found


def _cpu_name() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One stage of the GPU suite (run by benchmarks/gpu_suite.py)")
    parser.add_argument("name", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="UNIX time by which the stage must end")
    parser.add_argument("--rehearse", action="store_true", help="CPU, toy sizes, Triton through its interpreter")
    args = parser.parse_args(argv)

    stage = Stage(args.name, args.out, args.deadline, args.rehearse)
    stage.start_watchdog()
    module, function = STAGES[args.name].split(":")
    getattr(importlib.import_module(module), function)(stage)
    return EXIT_CHECKS_FAILED if stage.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
