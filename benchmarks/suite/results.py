"""The suite's results: one JSON line per figure, appended the moment it is measured.

A lent GPU can be taken back, and a stage can be killed at its deadline, at any moment. So no
figure waits for the end of anything: each is one ``write`` of one line to ``results.jsonl``
(opened for appending, synced to disk), and the report (the tables, and
``<gpu>-<date>.json``/``.txt``) is built from that file alone: at the end of a run, or
afterwards with ``gpu_suite.py --report DIR`` for a run that never reached its end. A line cut
short by a kill is skipped and reported, never fatal.

Kinds of line:

- ``figure``: a measured value: ``stage, group, name, value, unit`` and optionally ``shape,
  backend, baseline`` (the row of the same group it is compared with), ``spread`` ([lowest,
  highest] over rounds), ``note``; plus ``device, versions, rehearsal`` and the time.
- ``check``: a parity case: a figure (the error) with ``passed`` and ``tolerance``.
- ``note``: a row with no figure and one line saying why (a package missing, no time left).
- ``stage``: written by the suite when a stage ends: ``status`` (ok; failed: a parity check
  failed; crashed; killed: out of time; interrupted: the suite was; skipped: too little time
  left to start it), ``seconds``, ``share``, ``exit_code``, ``note``.
- ``suite``: the run's start: ``budget``, the planned ``stages``, ``rehearsal``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

RESULTS_FILE = "results.jsonl"
TUNING_FILE = "tuning.json"  # the autotuner's winners (gptforge/kernels/triton/tuning.py)
EXIT_CHECKS_FAILED = 3  # a stage's exit status when it ran but a parity check failed


def append(path: Path, record: dict) -> None:
    """Append one record as one line, in one write, and make it durable before returning."""
    line = json.dumps(_strict({"t": round(time.time(), 3), **record}), default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _strict(value):
    """JSON has no NaN or infinity: such floats are written as the strings "nan", "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def read(path: Path) -> tuple[list[dict], list[str]]:
    """(records, problems): every readable line, and a sentence for each line that is not."""
    records, problems = [], []
    if not path.is_file():
        return [], [f"{path} does not exist: nothing was measured"]
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            problems.append(f"{path.name} line {number} is not JSON (cut short by a kill?): skipped")
    return records, problems


def format_number(value: float) -> str:
    """Three significant digits or more: 12,345 / 123.4 / 1.23 / 0.0123 / 1.23e-05."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _first(records: list[dict], field: str, default=None):
    return next((r[field] for r in records if r.get(field)), default)


def summary(records: list[dict], problems: list[str] = ()) -> dict:
    """The run as one JSON-able dict: device, versions, date, stages, figures, checks."""
    start = next((r for r in records if r.get("kind") == "suite"), {})
    first_time = min((r["t"] for r in records if "t" in r), default=time.time())
    return dict(
        device=_first(records, "device", "unknown device"),
        date=time.strftime("%Y-%m-%d", time.gmtime(first_time)),
        versions=_first(records, "versions", {}),
        rehearsal=bool(start.get("rehearsal") or _first(records, "rehearsal", False)),
        budget=start.get("budget"),
        planned=start.get("stages", []),
        stages=[r for r in records if r.get("kind") == "stage"],
        figures=[r for r in records if r.get("kind") == "figure"],
        checks=[r for r in records if r.get("kind") == "check"],
        problems=list(problems),
    )


def table(run: dict) -> str:
    """The summary a person reads: stages, parity, then one table per group of figures."""
    v = run["versions"]
    lines = [
        f"GPU suite{' REHEARSAL (CPU, toy sizes: machinery only, no speed)' if run['rehearsal'] else ''} on "
        f"{run['device']}, {run['date']}: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
        "",
        f"stages (budget {run['budget']} s):" if run["budget"] else "stages:",
    ]
    ended = {s["stage"]: s for s in run["stages"]}
    for name in run["planned"] or list(ended):
        s = ended.get(name)
        if s is None:
            started = any(r["stage"] == name for r in run["figures"] + run["checks"])
            why = "cut short: no end recorded (the run was killed while it ran)" if started else "not reached"
            lines.append(f"  {name:<11} {why}")
            continue
        share = f" of {s['share']:.0f} s" if s.get("share") is not None else ""
        seconds = f"{s.get('seconds', 0):6.1f} s{share:<10}"
        lines.append(f"  {name:<11} {s['status']:<11} {seconds} {s.get('note', '')}".rstrip())
    lines += _checks(run["checks"])
    groups: dict[str, list[dict]] = {}
    for f in run["figures"]:
        groups.setdefault(f"{f['stage']}: {f['group']}", []).append(f)
    for group, rows in groups.items():
        lines += ["", group]
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            lines.append(f"  {r['name']:<{width}}  {format_number(r['value']):>10} {r['unit']:<9}"
                         f"{_spread(r):<8} {_ratio(r, rows):<22} {r.get('note', '')}".rstrip())  # fmt: skip
    for problem in run["problems"]:
        lines.append(f"note: {problem}")
    return "\n".join(lines)


def _checks(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    lines = ["", f"parity: {sum(c['passed'] for c in checks)} of {len(checks)} checks passed"]
    by_group: dict[str, list[dict]] = {}
    for c in checks:
        by_group.setdefault(c["group"], []).append(c)
    for group, rows in by_group.items():
        worst = max(rows, key=lambda c: _nan_last(float(c["value"]) / c["tolerance"]))
        lines.append(f"  {group:<44} {len(rows):3d} checks, worst error {float(worst['value']):.1e} "
                     f"(tolerance {worst['tolerance']:.0e})")  # fmt: skip
    for c in checks:
        if not c["passed"]:
            lines.append(f"  FAILED {c['group']}: {c['name']}: error {float(c['value']):.2e} > {c['tolerance']:.0e} "
                         f"{c.get('note', '')}".rstrip())  # fmt: skip
    return lines


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _spread(r: dict) -> str:
    lo, hi = r.get("spread") or (None, None)
    if lo is None or not r["value"]:
        return ""
    return f" ±{50 * (hi - lo) / abs(r['value']):.0f}%"


def _ratio(r: dict, rows: list[dict]) -> str:
    base = next((b for b in rows if b["name"] == r.get("baseline")), None)
    if base is None or base is r or not base["value"]:
        return ""
    return f"{r['value'] / base['value']:.2f}x vs {base['name']}"


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def write_report(out: Path, into: list[Path]) -> tuple[str, list[Path], dict]:
    """Build the table and ``<gpu>-<date>.json``/``.txt`` from ``out/results.jsonl`` and write
    the two files into each folder of ``into``; a rehearsal's only into ``out``, never beside
    real results. A folder that cannot be written (a read-only copy of a run) is noted and
    skipped. Returns (the table, the files written, the run's summary)."""
    run = summary(*read(out / RESULTS_FILE))
    if run["rehearsal"]:
        into = [out]
    stem = f"{'rehearsal-' if run['rehearsal'] else ''}{slug(run['device'])}-{run['date']}"
    written, skipped = [], []
    for folder in dict.fromkeys(into):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".txt"):
                path = folder / f"{stem}{suffix}"
                content = json.dumps(run, indent=1, default=str) if suffix == ".json" else table(run)
                tmp = path.with_suffix(suffix + ".tmp")
                tmp.write_text(content + "\n")
                os.replace(tmp, path)
                written.append(path)
        except OSError as e:
            skipped.append(f"the report was not written into {folder}: {e.strerror or e}")
    run["problems"] += skipped
    return table(run), written, run
