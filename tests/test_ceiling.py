"""The machine's own matmul ceiling (gptforge/train/ceiling.py): measured once per CPU model,
torch version, dtype and thread count, cached in $GPTFORGE_CACHE_DIR (a temporary folder in the
tests: conftest.py), and the denominator of MFU on the CPU."""

from __future__ import annotations

import json

import torch

from gptforge.train import ceiling
from gptforge.train.distributed import ProcessGroup

CPU = torch.device("cpu")


def test_a_short_measurement_is_plausible():
    flops, n = ceiling.measure_matmul_flops(CPU, torch.float32, budget_s=0.05)
    assert n & (n - 1) == 0 and 256 <= n <= ceiling.MAX_N["cpu"]
    assert 1e8 < flops < 1e14  # between a slow core and far beyond any CPU


def test_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(ceiling, "measure_matmul_flops", lambda d, t: calls.append(t) or (1.5e11, 1024))
    lines = []
    assert ceiling.measured_peak_flops(CPU, torch.float32, lines.append) == 1.5e11
    assert ceiling.measured_peak_flops(CPU, torch.float32, lines.append) == 1.5e11
    assert calls == [torch.float32] and len(lines) == 1 and "150 GFLOP/s" in lines[0]
    cached = json.loads((tmp_path / ceiling.CACHE_FILE).read_text())
    (key,) = cached
    assert key == ceiling.cache_key(CPU, torch.float32)
    assert torch.__version__ in key and "float32" in key and f"{torch.get_num_threads()} threads" in key
    assert ceiling.processor_name(CPU) in key
    ceiling.measured_peak_flops(CPU, torch.bfloat16)  # another dtype: measured for itself
    assert calls == [torch.float32, torch.bfloat16]


def test_a_damaged_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    (tmp_path / ceiling.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(ceiling, "measure_matmul_flops", lambda d, t: (2e11, 1024))
    assert ceiling.measured_peak_flops(CPU, torch.float32) == 2e11
    assert json.loads((tmp_path / ceiling.CACHE_FILE).read_text())


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("GPTFORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ceiling.cache_path() == tmp_path / "gptforge" / ceiling.CACHE_FILE


def test_run_ceilings_on_the_cpu(monkeypatch, tmp_path):
    """MFU has a denominator on the CPU (no datasheet peak); --peak_flops overrides the measurement."""
    from gptforge.train.config import TrainConfig

    monkeypatch.setattr(ceiling, "measure_matmul_flops", lambda d, t: (2e11, 1024))
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    group = ProcessGroup(CPU)
    assert ceiling.run_ceilings(TrainConfig(), CPU, torch.float32, group, print) == (2e11, None)
    assert ceiling.run_ceilings(TrainConfig(peak_flops=1e12), CPU, torch.float32, group, print) == (1e12, None)
