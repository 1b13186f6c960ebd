"""What a run reports: metrics.jsonl (one JSON row per log line, evaluation or skipped step),
the same rows to the experiment trackers asked for (TensorBoard, W&B: gptforge/train/tracking.py),
the log line itself, and loss.png drawn from the metrics file."""

from __future__ import annotations

import atexit
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from gptforge.train.tracking import Tracker, scalars_of

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short (a crash, a full disk) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Metrics:
    """The rows of this run (``history``), appended to ``out_dir/metrics.jsonl`` when ``write``
    (rank 0), and every row's numbers to each of ``trackers`` (rank 0's; started by ``start``).
    A row that cannot be written (a full disk) is reported and lost, not fatal: the next
    checkpoint stops the run, on every rank alike."""

    def __init__(self, out_dir: Path, write: bool, log: Callable[[str], None], trackers: Sequence[Tracker] = ()):
        self.path, self.write, self.log = out_dir / METRICS_FILE, write, log
        self.history: list[dict] = []
        self.trackers: list[Tracker] = list(trackers) if write else []
        self.step = 0  # of the last row with one: where a row without a step is logged
        if self.trackers:
            atexit.register(self.close)  # a run that ends in an exception still closes its W&B run

    def start(self, resumed_at: int | None) -> None:
        """Rank 0, at the start: a fresh run drops the earlier run's rows; a resumed one keeps
        the rows up to its checkpoint's step (the later ones are computed again). The trackers
        start likewise."""
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resumed_at]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._each_tracker(lambda t: t.start(resumed_at))

    def record(self, row: dict) -> None:
        self.history.append(row)
        if not self.write:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            self.log(f"could not append to {self.path} ({err.strerror or err}): the row of step {row.get('step')} "
                     "is lost")
        self.step = row.get("step", self.step)
        values = scalars_of(row)
        if values:
            self._each_tracker(lambda t: t.scalars(self.step, values))

    def text(self, name: str, text: str) -> None:
        """A text (the samples) to the trackers, at the last row's step."""
        self._each_tracker(lambda t: t.text(name, text, self.step))

    def close(self) -> None:
        """Close the trackers (flushes TensorBoard, finishes the W&B run); again: nothing."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 (a tracker's own error, whatever it is, must not end the run)
                self.log(f"{tracker.name}: could not close ({err})")

    def _each_tracker(self, fn: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                fn(tracker)
            except Exception as err:  # noqa: BLE001 (a tracker's own error, whatever it is, must not end the run)
                self.trackers.remove(tracker)
                self.log(f"{tracker.name} failed ({type(err).__name__}: {err}); the run goes on without it "
                         "(metrics.jsonl has every row)")

    def last_eval(self) -> dict:
        evals = [r for r in self.history if "val_loss" in r]
        return evals[-1] if evals else {}

    def evaluated_at(self, step: int) -> bool:
        """Whether this run, or the one it resumes (rank 0 reads the file), evaluated ``step``."""
        rows = self.history + (read_metrics(self.path) if self.write and self.path.is_file() else [])
        return any(r.get("step") == step and "val_loss" in r for r in rows)

    def plot(self) -> None:
        """loss.png beside the metrics file (rank 0)."""
        if not self.write:
            return
        try:
            plot_losses(self.path, self.path.parent / PLOT_FILE)
        except OSError as err:
            self.log(f"could not write {self.path.parent / PLOT_FILE} ({err.strerror or err})")


def log_line(row: dict, eta_s: float | None = None) -> str:
    """The line printed every log_interval steps; ``eta_s``: seconds the run has left."""
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
    if row.get("mfu_datasheet") is not None:  # a GPU: against its measured matmul ceiling, and its datasheet's
        mfu += f" of the measured peak, {100 * row['mfu_datasheet']:.1f}% of the datasheet's"
    memory = f", peak memory {row['peak_memory_mib']:,.0f} MiB" if row.get("peak_memory_mib") is not None else ""
    eta = f", ETA {duration(eta_s)}" if eta_s is not None else ""
    return (f"step {row['step']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, {row['tokens_per_s']:,.0f} tokens/s, "
            f"mfu {mfu}{memory}{eta}")


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (log lines) and train/val loss (eval lines) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    logs = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if logs:
        ax.plot([r["step"] for r in logs], [r["loss"] for r in logs], label="train (batch)", alpha=0.5)
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
