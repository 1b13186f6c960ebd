"""``make finetune``: the lecture's whole lifecycle on a CPU, with the held-out accuracy after each stage.

    python -m gptforge.train.finetune.lifecycle [--task reverse] [--seeds 1,2,3] [--out_dir out/finetune]

1. pre-train a character GPT on Tiny Shakespeare (the ``speedrun_cpu`` preset), or reuse the
   one already in ``OUT/pretrain``;
2. SFT on the task's problems (``finetune_sft_cpu``): its first evaluation, before any
   update, is the base model's accuracy;
3. RL from the SFT model against the task's checker (``finetune_rl_cpu``).

With several seeds, SFT and RL run once per seed (from the one pre-trained model) and the table
gives each stage's mean and spread. Everything lands under ``OUT``: each stage's run folder
(checkpoints, metrics.jsonl, loss.png; rl.png for RL), summary.json with the figures, and
rl_seeds.png: every seed's reward and held-out accuracy against the RL step.
Extra ``--key=value`` flags after ``--`` go to every fine-tuning stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gptforge.train.config import ConfigError, load_config
from gptforge.train.finetune.tasks import TASKS
from gptforge.train.metrics import read_metrics

PRESETS = dict(pretrain="speedrun_cpu", sft="finetune_sft_cpu", rl="finetune_rl_cpu")


def run_stage(preset: str, overrides: dict[str, str], quiet: bool = True) -> dict:
    from gptforge.train.checkpoint import list_checkpoints
    from gptforge.train.stages import train

    cfg = load_config(preset, dict(overrides, resume="auto"))  # an interrupted lifecycle goes on where it stopped
    found = list_checkpoints(cfg.out_dir)
    if found and found[-1].name == f"step_{cfg.max_iters:07d}":  # this stage ran to its end before
        return dict(reused=True)
    started = time.perf_counter()
    result = train(cfg, log=(lambda *_: None) if quiet else print)
    return {**result, "seconds": time.perf_counter() - started}


def accuracies(out_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of every evaluation of the run in ``out_dir``."""
    rows = read_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []
    return [(r["step"], r["accuracy"]) for r in rows if "accuracy" in r]


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:5.1f}%"
    return f"{100 * mean:5.1f}% ± {100 * statistics.stdev(values):4.1f} (min {100 * min(values):.1f}, " \
           f"max {100 * max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(prog="python -m gptforge.train.finetune.lifecycle", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, default="reverse")
    p.add_argument("--seeds", default="1", help="comma-separated seeds of the SFT and RL stages")
    p.add_argument("--out_dir", default="out/finetune")
    p.add_argument("--verbose", action="store_true", help="every stage's log lines, not just the summary")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise ValueError
    except ValueError:
        print(f"error: --seeds expects comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    overrides = dict(e[2:].split("=", 1) for e in extra if e.startswith("--") and "=" in e)
    started = time.perf_counter()
    try:
        pre = run_stage(PRESETS["pretrain"], dict(out_dir=str(out / "pretrain"), progress="false",
                                                  num_samples="0"), quiet=not args.verbose)
        print("pre-training: " + ("reused the model in " + str(out / "pretrain") if pre.get("reused") else
                                  f"val loss {pre['val_loss']:.4f} in {pre['seconds']:.0f} s"), flush=True)
        table: dict[str, list[float]] = dict(base=[], sft=[], rl=[])
        for seed in seeds:
            runs = {stage: out / f"seed{seed}" / stage for stage in ("sft", "rl")}
            common = dict(task=args.task, seed=str(seed), progress="false", **overrides)
            sft = run_stage(PRESETS["sft"], dict(common, init_from=str(out / "pretrain"), out_dir=str(runs["sft"])),
                            quiet=not args.verbose)
            rl = run_stage(PRESETS["rl"], dict(common, init_from=str(runs["sft"]), out_dir=str(runs["rl"])),
                           quiet=not args.verbose)
            sft_acc, rl_acc = accuracies(runs["sft"]), accuracies(runs["rl"])
            table["base"].append(sft_acc[0][1])
            table["sft"].append(sft_acc[-1][1])
            table["rl"].append(rl_acc[-1][1])
            took = "reused" if sft.get("reused") and rl.get("reused") else \
                f"{sft.get('seconds', 0) + rl.get('seconds', 0):.0f} s"
            print(f"seed {seed}: held-out accuracy base {100 * sft_acc[0][1]:.1f}% -> SFT {100 * sft_acc[-1][1]:.1f}% "
                  f"-> RL {100 * rl_acc[-1][1]:.1f}% ({took})", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{args.task}: held-out accuracy over {len(seeds)} seed(s), greedy answers")
    for stage, label in (("base", "pre-trained"), ("sft", "after SFT"), ("rl", "after RL")):
        print(f"  {label:<12} {spread(table[stage])}")
    from gptforge.train.finetune.plots import plot_rl_seeds

    plot_rl_seeds({seed: out / f"seed{seed}" / "rl" / "metrics.jsonl" for seed in seeds}, out / "rl_seeds.png")
    summary = dict(task=args.task, seeds=seeds, accuracy=table, seconds=time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{time.perf_counter() - started:.0f} s in all; figures in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
