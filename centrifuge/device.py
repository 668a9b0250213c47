"""The device a command runs on, checked before anything is loaded."""

from __future__ import annotations

import torch


def resolve_device(device: str | None) -> torch.device:
    """``"auto"`` or ``None``: cuda if available, else cpu; otherwise a torch
    device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``). Raises ValueError for
    an unknown or unsupported name, or a device this machine does not have."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS (Apple GPUs) is not available")
    if d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    return d
