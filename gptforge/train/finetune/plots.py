"""rl.png: the RL stage's reward and held-out accuracy against the step, from metrics.jsonl."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gptforge.train.metrics import read_metrics


def plot_rl(metrics_path: Path, png_path: Path, log: Callable[[str], None] = print) -> None:
    """The mean reward of each logged step's rollouts, and the held-out reward and accuracy of
    each evaluation (greedy answers)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "val_reward" in r]
    if not steps and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot([r["step"] for r in steps], [r["reward"] for r in steps], alpha=0.5, label="rollout reward (sampled)")
    ax.plot([r["step"] for r in evals], [r["val_reward"] for r in evals], "s-", label="held-out reward (greedy)")
    if any("accuracy" in r for r in evals):
        ax.plot([r["step"] for r in evals if "accuracy" in r], [r["accuracy"] for r in evals if "accuracy" in r],
                "o--", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=120)
    except OSError as err:
        log(f"could not write {png_path} ({err.strerror or err})")
    finally:
        plt.close(fig)


def plot_rl_seeds(runs: dict[int, Path], png_path: Path) -> None:
    """Every seed's RL run on one chart: the rollouts' mean reward (thin) and the held-out
    accuracy of each evaluation (markers), one colour a seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (seed, metrics_path) in enumerate(sorted(runs.items())):
        rows = read_metrics(metrics_path) if metrics_path.is_file() else []
        colour = f"C{n}"
        steps = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "accuracy" in r]
        ax.plot([r["step"] for r in steps], [r["reward"] for r in steps], color=colour, alpha=0.35,
                label=f"seed {seed}: rollout reward")
        ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color=colour,
                label=f"seed {seed}: held-out accuracy")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
