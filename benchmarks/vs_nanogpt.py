"""Our trainer against nanoGPT's own ``train.py``, side by side on this machine.

Both train a character-level GPT on Tiny Shakespeare with the same flags — by default
nanoGPT's README CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0,
eval every 250 steps over 20 batches, a log line every step) — as whole processes, the way
a user runs them. Rounds alternate which goes first (A B, then B A, ...), so neither gains
from the order, and the first ``--skip`` steps of every run are left out (warm-up, compile).
A run's figure is its median tokens/s over the steps after that; the table shows the median
over rounds with the lowest and highest, and the ratio of the medians.

    python -m benchmarks.vs_nanogpt --nanogpt ~/src/nanoGPT [--rounds 3] [--compile off,on]

nanoGPT's checkout is only read: its data is prepared by its own ``data/shakespeare_char/
prepare.py`` in a temporary folder (from the same checksum-verified Tiny Shakespeare we use).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> flags given to both trainers (nanoGPT's names; ours are the same)
SHAPES = {
    # nanoGPT's README: "python train.py config/train_shakespeare_char.py --device=cpu --compile=False
    # --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    # --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
    "recipe": dict(block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128),
    # a wider, longer-context shape where the matrix products dominate
    "wide": dict(block_size=128, batch_size=16, n_layer=4, n_head=4, n_embd=256),
}
# what config/train_shakespeare_char.py sets that our defaults differ from: given to ours explicitly
# (and nanoGPT's model: no biases by default, and its MLP's exact GELU rather than GPT-2's tanh form)
NANOGPT_CONFIG = dict(learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, eval_interval=250,
                      weight_decay=0.1, grad_clip=1.0, bias=False, activation="gelu", dropout=0.0, eval_iters=20,
                      log_interval=1, lr_decay_iters=2000)
NANOGPT_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)


def prepare_nanogpt(nanogpt: Path, work: Path) -> Path:
    """A folder to run nanoGPT's train.py in (it reads configurator.py and data/ from the
    working directory), with Tiny Shakespeare prepared by nanoGPT's own prepare.py."""
    from gptforge.data.download import fetch_shakespeare

    for name in ("train.py", "model.py", "configurator.py", "data/shakespeare_char/prepare.py"):
        if not (nanogpt / name).is_file():
            raise SystemExit(f"--nanogpt {nanogpt}: no {name} there; expected a checkout of "
                             "https://github.com/karpathy/nanoGPT")
    run_dir = work / "nanogpt"
    data = run_dir / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    shutil.copy(nanogpt / "configurator.py", run_dir)
    shutil.copytree(nanogpt / "config", run_dir / "config")
    shutil.copy(nanogpt / "data/shakespeare_char/prepare.py", data)
    (data / "input.txt").write_bytes(fetch_shakespeare(work / "downloads"))
    subprocess.run([sys.executable, str(data / "prepare.py")], check=True, capture_output=True)
    return run_dir


def flags(settings: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in settings.items()]


def run_nanogpt(nanogpt: Path, run_dir: Path, shape: dict, steps: int, compile: bool, env: dict) -> list[float]:
    """Seconds per iteration, as nanoGPT's log prints them, for iterations 0..steps-1."""
    settings = dict(device="cpu", compile=compile, eval_iters=20, log_interval=1, **shape, max_iters=steps,
                    lr_decay_iters=2000, dropout=0.0, out_dir=run_dir / "out")
    cmd = [sys.executable, str(nanogpt / "train.py"), "config/train_shakespeare_char.py", *flags(settings)]
    out = run(cmd, run_dir, env)
    times = {int(i): float(ms) / 1e3 for i, _, ms in NANOGPT_ITER.findall(out)}
    return [times[i] for i in sorted(times)]


def run_ours(work: Path, shape: dict, steps: int, compile: bool, dtype: str, env: dict,
             extra: list[str]) -> list[float]:
    """Seconds per step, from the metrics file's tokens/s (logged every step), for steps 1..steps."""
    out_dir = work / "ours"
    settings = dict(dataset="shakespeare_char", device="cpu", dtype=dtype, compile=compile, **NANOGPT_CONFIG,
                    **shape, max_iters=steps, data_dir=work / "data", out_dir=out_dir)
    cmd = [sys.executable, "-m", "gptforge.train", *flags(settings), "--overwrite", "--progress=false",
           "--num_samples=0",
           *extra]
    run(cmd, ROOT, env)
    tokens = shape["batch_size"] * shape["block_size"]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [tokens / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="recipe")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each trainer, alternating (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default 300)")
    parser.add_argument("--skip", type=int, default=50, help="first steps of a run not timed (default 50)")
    parser.add_argument("--compile", default="off,on", help="off, on or off,on (default): torch.compile for both")
    parser.add_argument("--dtypes", default="auto,fp32",
                        help="our --dtype settings to run, each a contender (default auto,fp32; auto is bf16 on "
                             "CPUs with AMX, else fp32; nanoGPT computes in fp32 on the CPU)")
    parser.add_argument("--ours", default="", help="extra flags for our trainer")
    args = parser.parse_args(argv)
    if args.steps <= args.skip + 10:
        parser.error(f"--steps {args.steps} leaves too few timed steps after --skip {args.skip}")
    modes = [{"off": False, "on": True}[m] for m in args.compile.split(",")]
    shape, tokens = SHAPES[args.shape], SHAPES[args.shape]["batch_size"] * SHAPES[args.shape]["block_size"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    import torch

    print(f"ours vs nanoGPT's train.py ({args.nanogpt}), shape {args.shape} {shape}, {args.steps} steps per run, "
          f"median tokens/s over steps {args.skip + 1}-{args.steps}; {args.rounds} rounds, alternating order; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vs_nanogpt_") as tmp:
        work = Path(tmp)
        run_dir = prepare_nanogpt(args.nanogpt.expanduser().resolve(), work)
        contenders = [f"ours --dtype={d}" for d in args.dtypes.split(",")] + ["nanoGPT"]
        for compile in modes:
            rate = {who: [] for who in contenders}
            for r in range(args.rounds):
                shift = r % len(contenders)  # each contender goes first in turn
                for who in contenders[shift:] + contenders[:shift]:
                    start = time.perf_counter()
                    if who == "nanoGPT":
                        seconds = run_nanogpt(args.nanogpt.expanduser().resolve(), run_dir, shape, args.steps,
                                              compile, env)
                    else:
                        dtype = who.removeprefix("ours --dtype=")
                        seconds = run_ours(work, shape, args.steps, compile, dtype, env, args.ours.split())
                    rate[who].append(tokens / statistics.median(seconds[args.skip:]))
                    print(f"  compile={compile} round {r + 1} {who:18s} {rate[who][-1]:9,.0f} tokens/s "
                          f"(run {time.perf_counter() - start:.1f} s)", flush=True)
            results[compile] = rate
    print(f"\n{'compile':8s} {'':18s} {'tokens/s: median (min-max)':>28s}  vs nanoGPT (per round)")
    for compile, rate in results.items():
        base = statistics.median(rate["nanoGPT"])
        for who, values in rate.items():
            versus = "" if who == "nanoGPT" else f"{statistics.median(values) / base:.2f}x (" + ", ".join(
                f"{a / b:.2f}" for a, b in zip(values, rate["nanoGPT"], strict=True)) + ")"
            print(f"{str(compile):8s} {who:18s} {summary(values):>28s}  {versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
