"""Everything that needs a GPU, in one command that fits a lent machine's time.

    python3 benchmarks/gpu_suite.py                        # the whole suite in 480 s
    python3 benchmarks/gpu_suite.py --budget 300 --only card,attention
    python3 benchmarks/gpu_suite.py --report DIR           # the tables of a run, even a killed one
    python3 benchmarks/gpu_suite.py --rehearse             # the same machinery on the CPU, toy sizes

Stages, most important first (benchmarks/suite/ has one file per concept):

    card        the card; its measured copy bandwidth and bf16 matmul ceilings
    parity      our Triton kernels against float64 references, natively
    attention   causal attention: ours (autotuned, and every kernel variant forced), SDPA (flash,
                cuDNN, memory-efficient), flash_attn, torch; the winner per shape
    layer_norm  LayerNorm and add+LayerNorm against F.layer_norm, as % of the copy ceiling
    train       GPT-2 124M training step per attention backend, eager and compiled: tokens/s, MFU
    generate    tokens/s with and without the KV cache

One deadline holds for the whole run: the budget is shared out among the stages by weight, in
order, and what a stage leaves unused passes to the stages after it. Each stage is a process in
a process group of its own, killed with everything it started when its share is spent; a
stage that crashes is reported and the next one starts. Every figure is appended to
``DIR/results.jsonl`` the moment it is measured, and the table and ``<gpu>-<date>.json``/``.txt``
are built from that file at the end (and copied into benchmarks/results/), or afterwards by
``--report DIR``. DIR is ``$OUT`` when that is set, else ``out/gpu_suite``. A run leaves five
files there: results.jsonl, suite.log (everything printed), tuning.json (the autotuner's
winners, which the next run on the same card and triton version reuses instead of timing
again) and the two report files; a run in a DIR used before keeps the earlier results.jsonl
and suite.log beside them, renamed previous-*.

Exit status: 0 when every stage ran to its end (in a rehearsal: and the planted faults behaved
as planted), 1 otherwise, 2 when there is no GPU (without --rehearse).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.suite import results  # noqa: E402  (no torch here: the suite's own process stays light)
from benchmarks.suite.results import EXIT_CHECKS_FAILED, TUNING_FILE  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
LOG_FILE = "suite.log"
DEFAULT_BUDGET_S = 480.0
# Kept back from the stages: killing the last one, and writing the report.
RESERVE_S = 6.0


@dataclass(frozen=True)
class Plan:
    name: str
    weight: float  # its share of the budget, relative to the stages after it
    minimum: float  # below this many seconds the stage is not started
    planted: str | None = None  # rehearsal only: the status this planted fault must end with


GPU_PLAN = [
    Plan("card", 20, 10), Plan("parity", 80, 15), Plan("attention", 180, 20), Plan("layer_norm", 40, 10),
    Plan("train", 125, 40), Plan("generate", 35, 15),
]  # fmt: skip
# The rehearsal: the same stages at toy sizes, with a planted overrun and crash in the middle,
# so the stages after them prove that the suite goes on.
REHEARSAL_PLAN = [
    Plan("card", 6, 4), Plan("parity", 20, 8), Plan("attention", 34, 5), Plan("layer_norm", 10, 4),
    Plan("overrun", 8, 3, planted="killed"), Plan("crash", 8, 3, planted="crashed"),
    Plan("train", 32, 8), Plan("generate", 7, 4),
]  # fmt: skip


class Interruption:
    """SIGTERM or SIGINT reached the suite: the handler kills the running stage's group at once
    and notes the signal; the suite then records that stage, starts no other and reports."""

    signal: str | None = None
    pgid: int | None = None  # the running stage's process group

    @classmethod
    def handle(cls, signum, frame) -> None:
        cls.signal = signal.Signals(signum).name
        if cls.pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cls.pgid, signal.SIGKILL)


class Log:
    """Everything the suite and its stages print: to stdout and to DIR/suite.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "ab", buffering=0)  # open for the whole run, unbuffered
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.file.write(data)
            with contextlib.suppress(OSError):  # a closed stdout must not stop the run
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()

    def say(self, text: str) -> None:
        self.write(f"[gpu_suite] {text}\n".encode())

    def pump(self, stream) -> threading.Thread:
        """Copy a stage's output as it comes, in chunks, not lines (a progress bar has none)."""

        def copy() -> None:
            fd = stream.fileno()
            while chunk := os.read(fd, 65536):
                self.write(chunk)

        thread = threading.Thread(target=copy, daemon=True, name="stage-output")
        thread.start()
        return thread


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, log: Log) -> None:
    """SIGKILL every process of the group and wait until none is left (a few seconds at most)."""
    for _ in range(40):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
        if not group_members(pgid):
            return
    log.say(f"process group {pgid} still has members after SIGKILL: {group_members(pgid)}")


def share_of(plan: list[Plan], index: int, seconds_left: float) -> float:
    """Stage ``index``'s share of what is left: its weight over the weights of the stages from
    it onwards. Time an earlier stage did not use is part of ``seconds_left``, so it passes to
    the stages after it in proportion to their weights."""
    return max(0.0, seconds_left) * plan[index].weight / sum(p.weight for p in plan[index:])


def run_stage(plan: Plan, share: float, out: Path, rehearse: bool, log: Log, env: dict) -> dict:
    """Run one stage within ``share`` seconds; returns its ``stage`` record."""
    deadline = time.time() + share
    cmd = [sys.executable, "-m", "benchmarks.suite.stage", plan.name, "--out", str(out), "--deadline",
           repr(deadline)] + (["--rehearse"] if rehearse else [])  # fmt: skip
    log.say(f"stage {plan.name}: up to {share:.0f} s")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    Interruption.pgid = proc.pid
    if Interruption.signal:  # a signal came between the start and the line above
        Interruption.handle(signal.Signals[Interruption.signal], None)
    pump = log.pump(proc.stdout)
    code, status, note = None, "killed", ""
    try:
        code = proc.wait(timeout=max(0.0, deadline - time.time()))
        if Interruption.signal:
            status, note = "interrupted", f"the suite received {Interruption.signal}: its process group was killed"
        elif code == 0:
            status, note = "ok", ""
        elif code == EXIT_CHECKS_FAILED:
            status, note = "failed", "parity checks failed"
        else:
            status, note = "crashed", f"exit status {code}: see suite.log"
    except subprocess.TimeoutExpired:
        status, note = "killed", f"out of time after {share:.0f} s: its process group was killed"
    finally:
        kill_group(proc.pid, log)  # its leftovers too (compile workers, a child it started)
        proc.wait()
        ended = time.time()  # the stage's time ends here: draining its log below is the suite's
        Interruption.pgid = None
        pump.join(timeout=2)
    record = dict(kind="stage", stage=plan.name, status=status, seconds=round(ended - start, 1),
                  share=round(share, 1), exit_code=code, note=note)  # fmt: skip
    results.append(out / results.RESULTS_FILE, record)
    log.say(f"stage {plan.name}: {status} in {record['seconds']} s {note}".rstrip())
    return record


def stage_env(rehearse: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if rehearse:
        env["TRITON_INTERPRET"] = "1"  # before any stage imports triton
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter, on a GPU
    return env


def prepare_out(out: Path) -> None:
    """A fresh results.jsonl for this run; an earlier run's is kept beside it, renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (results.RESULTS_FILE, LOG_FILE):
        old = out / name
        if old.is_file():
            old.replace(out / f"previous-{name}")


def report(out: Path, into: list[Path], log: Log | None = None) -> str:
    """Print the run's table and write its report files (and, for a real run, keep the
    autotuner's winners in benchmarks/results/ too, so the next session starts tuned)."""
    text, written, run = results.write_report(out, into)
    if RESULTS_DIR in into and not run["rehearsal"] and run["figures"] and (out / TUNING_FILE).is_file():
        keep = RESULTS_DIR / f"{results.slug(run['device'])}-{TUNING_FILE}"
        shutil.copyfile(out / TUNING_FILE, keep)
        written.append(keep)
    message = "\n".join(["", "=" * 100, text, "", "written: " + (", ".join(map(str, written)) or "nothing")])
    if log:
        log.write((message + "\n").encode())
    else:
        print(message)
    return text


def run_suite(args: argparse.Namespace, started: float) -> int:
    deadline = started + args.budget
    plan = REHEARSAL_PLAN if args.rehearse else GPU_PLAN
    if args.only:
        plan = [p for p in plan if p.name in args.only]
    out = args.out.resolve()
    prepare_out(out)
    log = Log(out / LOG_FILE)
    signal.signal(signal.SIGTERM, Interruption.handle)
    signal.signal(signal.SIGINT, Interruption.handle)
    results.append(out / results.RESULTS_FILE, dict(kind="suite", budget=args.budget, rehearsal=args.rehearse,
                                                   stages=[p.name for p in plan], argv=sys.argv[1:]))  # fmt: skip
    log.say(f"budget {args.budget:.0f} s, stages {', '.join(p.name for p in plan)}; results in {out}")
    env = stage_env(args.rehearse)
    ended: dict[str, dict] = {}
    for i, p in enumerate(plan):
        if Interruption.signal:
            log.say(f"interrupted by {Interruption.signal}: no further stage is started")
            break
        share = share_of(plan, i, deadline - RESERVE_S - time.time())
        if share < p.minimum:
            ended[p.name] = dict(kind="stage", stage=p.name, status="skipped", seconds=0.0, share=round(share, 1),
                                 exit_code=None, note=f"{share:.0f} s left for it, it needs {p.minimum:.0f}")
            results.append(out / results.RESULTS_FILE, ended[p.name])
            log.say(f"stage {p.name}: skipped ({ended[p.name]['note']})")
            continue
        ended[p.name] = run_stage(p, share, out, args.rehearse, log, env)
    report(out, [out, RESULTS_DIR], log)
    log.say(f"done in {time.time() - started:.0f} s of a {args.budget:.0f} s budget")
    as_planned = all(ended.get(p.name, {}).get("status") == (p.planted or "ok") for p in plan)
    return 0 if as_planned else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, report included (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "out" / "gpu_suite"),
                        help="folder for results.jsonl and the report (default: $OUT, else out/gpu_suite)")
    parser.add_argument("--only", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=None,
                        help="comma-separated stages to run, e.g. card,attention (default: all)")
    parser.add_argument("--report", type=Path, metavar="DIR", help="only rebuild the report of the run in DIR")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every stage's machinery on the CPU at toy sizes (Triton through its interpreter)")
    args = parser.parse_args(argv)  # fmt: skip
    if args.budget <= RESERVE_S:
        parser.error(f"--budget must be more than {RESERVE_S:.0f} seconds, got {args.budget:g}")
    if args.only:
        known = [p.name for p in (REHEARSAL_PLAN if args.rehearse else GPU_PLAN)]
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"--only: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # the budget counts from here, torch's import below included
    args = parse_args(argv)
    if args.report:
        if not (args.report / results.RESULTS_FILE).is_file():
            print(f"--report: no {results.RESULTS_FILE} in {args.report}", file=sys.stderr)
            return 2
        report(args.report, [RESULTS_DIR])
        return 0
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_suite needs a CUDA GPU, and torch {torch.__version__} sees none here. On the CPU, "
                  "`gpu_suite.py --rehearse` runs the suite's machinery at toy sizes, `make bench` the "
                  "benchmarks and `make test` the parity tests (through Triton's interpreter).",
                  file=sys.stderr)  # fmt: skip
            return 2
    return run_suite(args, started)


if __name__ == "__main__":
    sys.exit(main())
