"""Training throughput and memory per strategy: single process, DDP, FSDP2 and DeepSpeed ZeRO-2,
each a real ``python -m gptforge.train`` run (under torchrun for the distributed ones) of the same
global batch.

The figure is the tokens/s of the run's last log interval (``metrics.jsonl``), so start-up,
compilation and the first steps are not counted; per-rank throughput and the scaling
efficiency against the single process are printed beside it, and what each rank holds after
its first update (parameters, gradients, optimizer state: the trainer counts the bytes of the
tensors themselves, a shard its own part; DeepSpeed keeps its gradients in buffers of its own).
On a machine with N GPUs, ``GPT_BENCH_RANKS=N`` sets the rank count (default: 2 on the CPU, all GPUs on CUDA).

Every side gets the same threads in all (``GPT_BENCH_THREADS``, default: the machine's cores):
the single process all of them, each of N ranks 1/N of them (OMP_NUM_THREADS, which torch and
torchrun honour), and the table's title says so. Otherwise the single process and the ranks
compete on different terms and the "scaling efficiency" means nothing. An efficiency above 100%
(impossible for ranks sharing the same cores) and a spread over log intervals wider than the
difference are printed as warnings beside the figure. make bench runs single and ddp; make
bench-full adds fsdp and DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import DEVICE, Result, record

REPO = Path(__file__).resolve().parents[1]
RANKS = int(os.environ.get("GPT_BENCH_RANKS", torch.cuda.device_count() if DEVICE.type == "cuda" else 2))
THREADS = int(os.environ.get("GPT_BENCH_THREADS", os.cpu_count() or 1))  # in all, on every side
RANK_THREADS = max(1, THREADS // RANKS)
if DEVICE.type == "cuda":
    MODEL = ["--config", "gptforge/train/configs/gpt2.toml", "--batch_size=8", f"--gradient_accumulation_steps={RANKS}",
             "--max_iters=30", "--log_interval=10", "--compile=false"]
    GROUP = f"training: GPT-2 124M, {RANKS} GPU(s), {THREADS} CPU threads on every side"
else:
    # AdamW for every strategy (the preset's Muon does not run under DeepSpeed)
    MODEL = ["--config", "gptforge/train/configs/shakespeare_char_cpu.toml", f"--gradient_accumulation_steps={RANKS}",
             "--max_iters=40", "--log_interval=10", "--optimizer=adamw", "--compile=false"]
    GROUP = (f"training: CPU char model (4x4x128, T=128, B=32 per rank), {RANKS} rank(s) on the CPU; the same "
             f"{THREADS} threads on every side (single: {THREADS}, each rank: {RANK_THREADS})")
COMMON = ["--eval_interval=100000", "--num_samples=0", "--progress=false", "--overwrite"]
STRATEGIES = {
    "single": ([], ["--strategy=single"]),
    "ddp": (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"], ["--strategy=ddp"]),
    "fsdp": (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"], ["--strategy=fsdp"]),
    "deepspeed zero-2": (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"],
                         ["--strategy=deepspeed", "--zero_stage=2"]),
}
SINGLE: dict[str, float] = {}


@pytest.mark.parametrize("strategy", [s if s in ("single", "ddp") else pytest.param(s, marks=pytest.mark.full)
                                      for s in STRATEGIES])
def test_strategy(benchmark, strategy, tmp_path):
    launcher, flags = STRATEGIES[strategy]
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    if strategy != "single" and RANKS < 2:
        pytest.skip("one device: nothing to distribute")
    data_dir = os.environ.get("GPT_BENCH_DATA_DIR", str(REPO / "data"))
    # the same global batch everywhere: on one process, all of it is accumulation steps
    cmd = [sys.executable, *launcher, "-m", "gptforge.train", *MODEL, *COMMON, *flags, f"--out_dir={tmp_path}",
           f"--data_dir={data_dir}"]

    threads = THREADS if strategy == "single" else RANK_THREADS
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run() -> None:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.pedantic(run, rounds=1, iterations=1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the log intervals after the first (start-up and first steps left out): the median, and the spread
    intervals = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    tokens_per_s = statistics.median(intervals)
    ranks = 1 if strategy == "single" else RANKS
    if strategy == "single":
        SINGLE["tokens_per_s"] = tokens_per_s
    note = f"({tokens_per_s / ranks:,.0f} per rank"
    if strategy != "single" and SINGLE:
        efficiency = tokens_per_s / (ranks * SINGLE["tokens_per_s"])
        note += f", scaling efficiency {efficiency:.0%}"
        if efficiency > 1.0:
            note += (" WARNING: over 100% is impossible for ranks that share the single run's threads: the runs "
                     "were measured under different conditions (other load?); do not trust this figure")
    held = [r["memory_per_rank"] for r in rows if "memory_per_rank" in r][0]
    note += "; held per rank, MiB (params / grads / optimizer): " + ", ".join(
        "/".join("n/a" if m[k] is None else f"{m[k] / 2**20:.1f}" for k in ("parameters", "gradients",
                                                                            "optimizer_state")) for m in held)
    record(benchmark, Result(GROUP, strategy, tokens_per_s, "tokens/s", baseline="single", note=note + ")",
                             spread=(min(intervals), max(intervals))))
    benchmark.extra_info["memory_per_rank"] = held
