"""Device, precision, seeds, the kernel backends a device can run, and its peak FLOP/s (for MFU)."""

from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

from gptforge import kernels
from gptforge.gpt import device as gpt_device
from gptforge.train.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense tensor-core peaks (FLOP/s) from the vendors' datasheets: (bf16/fp16, tf32).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the PCIe card is lower (756e12), matched below
    "H100 PCIe": (756e12, 378e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
}


def pick_device(name: str) -> torch.device:
    try:
        return gpt_device.pick_device(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA where supported (else fp16); on the CPU, bf16 where it has AMX
    tiles (Intel Sapphire Rapids and later), else fp32. With AMX, bf16 matrix products run
    about 4x faster than fp32 ones (768x128 @ 128x384: 71 against 280 us on 2 Xeon cores),
    and bf16 autocast trained nanoGPT's CPU recipe 1.34x faster to the same losses (val
    2.4076 against 2.4073 at step 300); without AMX, bf16 has no fast matrix product."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else torch.float32
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --dtype=fp16 or fp32")
    return dtype


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles with bf16 (what makes bf16 autocast pay on the CPU)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; parameters and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of one device at ``dtype``, or None when not known (the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_FLOPS if key in name]
    if not matches:
        return None
    half, tf32 = PEAK_FLOPS[max(matches, key=len)]  # the most specific name wins
    return tf32 if dtype == torch.float32 else half


def peak_memory_mib(device: torch.device) -> float:
    """The run's peak memory so far, in MiB: on CUDA the most the caching allocator held for
    tensors (``max_memory_allocated``); elsewhere the process's peak resident set (ru_maxrss),
    which counts everything the process holds, torch's libraries included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix; ru_maxrss is in KiB on Linux, in bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed torch, numpy and python; allow TF32 matmuls on CUDA (fp32 training, as nanoGPT)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_backends(choices: dict[str, str], device: torch.device) -> None:
    """Each op's backend (``{"attention": "triton", ...}``; "auto": GPT_KERNELS if it names
    one) can run on ``device``: checked at the start rather than at the first forward."""
    for op, name in choices.items():
        if name == "auto":
            name = kernels.selected(op)
        available = kernels.available_backends(op, device)
        if name != "auto" and name not in available:
            raise ConfigError(f"{op} backend {name!r} cannot run on {device.type} here; available: {available} "
                              "(or auto)")
