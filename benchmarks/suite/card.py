"""Stage a: the card, and the two ceilings every later figure is read against.

- What the card is: name, SM count, memory, compute capability, driver (from nvidia-smi).
- Measured ceilings, on random data (zeros run faster than real data on some cards):
  device-to-device copy bandwidth, counting bytes read plus bytes written, and a large bf16
  matrix product's TFLOP/s. The kernels' GB/s and the training step's MFU are read against
  these, beside the datasheet.
"""

from __future__ import annotations

import subprocess

import torch

from benchmarks.suite.stage import Stage

GROUP_CARD, GROUP_CEILINGS = "the card", "measured ceilings"


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)  # fmt: skip
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (nvidia-smi did not answer)"


def run(stage: Stage) -> None:
    if stage.cuda:
        props = torch.cuda.get_device_properties(stage.device)
        driver = driver_version()
        stage.figure(GROUP_CARD, "streaming multiprocessors", props.multi_processor_count, "SMs")
        stage.figure(GROUP_CARD, "memory", props.total_memory / 2**30, "GiB")
        stage.figure(GROUP_CARD, "compute capability", props.major + props.minor / 10, "",
                     note=f"sm_{props.major}{props.minor}, driver {driver}, CUDA {torch.version.cuda}")  # fmt: skip
        copy_elements, matmul_n, dtype = 1 << 30, 8192, torch.bfloat16  # 2 GiB copied; 1.1 TFLOP
    else:  # the rehearsal: the same code at toy sizes
        stage.figure(GROUP_CARD, "CPU threads", torch.get_num_threads(), "threads")
        copy_elements, matmul_n, dtype = 1 << 22, 256, torch.float32

    src = torch.randn(copy_elements, device=stage.device, dtype=dtype)
    dst = torch.empty_like(src)
    a, b = (torch.randn(matmul_n, matmul_n, device=stage.device, dtype=dtype) for _ in range(2))
    fns = dict(copy=lambda: dst.copy_(src), matmul=lambda: a @ b)
    for fn in fns.values():  # warm-up: cuBLAS handles and workspaces
        fn()
    stage.sync()
    times = stage.interleaved(fns, rounds=5)

    copy_bytes = 2 * src.nbytes
    median, fastest, slowest = times["copy"]
    stage.figure(GROUP_CEILINGS, "copy (read + write)", copy_bytes / median / 1e9, "GB/s", ceiling="copy",
                 spread=[copy_bytes / slowest / 1e9, copy_bytes / fastest / 1e9],
                 note=f"{src.nbytes / 2**30:.2f} GiB copied device to device")  # fmt: skip
    flops = 2 * matmul_n**3
    median, fastest, slowest = times["matmul"]
    dtype_name = str(dtype).removeprefix("torch.")
    stage.figure(GROUP_CEILINGS, f"matmul {matmul_n}^3 {dtype_name}", flops / median / 1e12, "TFLOP/s",
                 ceiling="matmul", spread=[flops / slowest / 1e12, flops / fastest / 1e12],
                 note="random data")  # fmt: skip
