"""The device a model runs on, from a name a user typed: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` is the GPU where there is one; a device this machine lacks is a ValueError that
    says so (rather than a failure deep inside the first tensor moved there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {device.type!r} is not supported; use cpu or cuda")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:1, and runs on the one CPU
        raise ValueError(f"device {name!r} does not exist: the CPU is one device; use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device; use --device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    return device
