"""This machine's own matmul ceiling, the denominator of MFU on the CPU as on the GPU.

A datasheet peak exists for GPUs (gptforge/train/device.py) but not for the CPU in front of us:
its FLOP/s depend on the vector units (AVX-512, AMX), the clock and the threads torch uses. So
the ceiling is measured: the best FLOP/s of square matrix products at the run's dtype, in about
a second, once per CPU (or GPU) model, torch version, dtype and thread count, and cached in a
small JSON file: ``$GPTFORGE_CACHE_DIR`` (tests point it at a temporary folder), else
``$XDG_CACHE_HOME/gptforge``, else ``~/.cache/gptforge``. MFU against it says how far a run is
from what this machine's matrix units do on large products; a figure near or above 100% means
the ceiling was measured while something else had the cores (delete the cache file to measure
it again). On a GPU the datasheet peak is kept beside it, as benchmarks/gpu_suite.py does.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptforge.train.config import TrainConfig
from gptforge.train.device import peak_flops
from gptforge.train.distributed import ProcessGroup

CACHE_FILE = "matmul_ceiling.json"
BUDGET_S = 1.0  # timed products after the warm-up; the whole measurement takes 1 to 2 s
MAX_N = {"cpu": 2048, "cuda": 8192}  # 8192^3 in bf16: 1.1 TFLOP, the GPU suite's product
MIN_CALL_S = {"cpu": 0.01, "cuda": 0.002}  # grow the product until one call takes this long


def cache_path() -> Path:
    base = os.environ.get("GPTFORGE_CACHE_DIR")
    if base:
        return Path(base) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gptforge" / CACHE_FILE


def processor_name(device: torch.device) -> str:
    """The CPU's model name (/proc/cpuinfo on Linux) or the GPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{processor_name(device)}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}{threads}"


def measured_peak_flops(device: torch.device, dtype: torch.dtype, log: Callable[[str], None] | None = None) -> float:
    """This device's matmul FLOP/s at ``dtype``: from the cache, or measured (and cached) now."""
    path, key = cache_path(), cache_key(device, dtype)
    cached = _read(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), int | float) and entry["flops"] > 0:
        return float(entry["flops"])
    started = time.perf_counter()
    flops, n = measure_matmul_flops(device, dtype)
    if log:
        log(f"matmul ceiling of {key}: {flops / 1e9:,.0f} GFLOP/s ({n}x{n} products, measured in "
            f"{time.perf_counter() - started:.1f} s, cached in {path})")
    cached[key] = dict(flops=flops, n=n, measured=datetime.date.today().isoformat())
    _write(path, cached)
    return flops


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = BUDGET_S) -> tuple[float, int]:
    """(best FLOP/s, n) of ``n x n @ n x n`` products at ``dtype``: n doubles from 256 until one
    product takes MIN_CALL_S (so call overhead is noise) or reaches MAX_N; then products are timed
    for ``budget_s`` and the fastest counts: the ceiling, not the typical."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        seconds = _time_one(a, b, device)
        if seconds >= MIN_CALL_S[kind] or n >= MAX_N[kind]:
            break
        n *= 2
    best, deadline = seconds, time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        best = min(best, _time_one(a, b, device))
    return 2 * n**3 / best, n


def _time_one(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    torch.matmul(a, b)  # warm: the first call of a shape may pick its kernel
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    torch.matmul(a, b)
    return time.perf_counter() - start


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: measured again
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Write-and-rename (two runs starting together never leave half a file); a cache that
    cannot be written only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def run_ceilings(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, group: ProcessGroup,
                 log: Callable[[str], None]) -> tuple[float | None, float | None]:
    """(ceiling, datasheet peak) of all ``group``'s devices together, FLOP/s, on rank 0 (the
    rank that logs; None elsewhere). The ceiling is ``--peak_flops`` if set, else the measured
    matmul ceiling; the datasheet peak is a known GPU's (gptforge/train/device.py), else None."""
    if not group.is_main:
        return None, None
    ceiling = cfg.peak_flops or measured_peak_flops(device, dtype, log)
    datasheet = peak_flops(device, dtype)
    return ceiling * group.world_size, datasheet * group.world_size if datasheet else None
