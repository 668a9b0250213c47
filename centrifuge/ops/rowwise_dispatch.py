"""When the row-wise ops (RMSNorm, SwiGLU, RoPE, LM head + cross-entropy) use
their Triton kernels.

Kernels run on CUDA tensors of half or single precision when Triton imports;
everything else (CPU, float64) takes the plain PyTorch reference, which *is* the
semantics. ``CENTRIFUGE_ROWWISE_KERNELS=0`` or :func:`kernels_disabled` turn the
kernels off, so a benchmark or a test can run the torch composition on the same
device and compare.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:  # Triton is an optional dependency (the `triton` extra); CPU installs may lack it.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_state = {"enabled": os.environ.get("CENTRIFUGE_ROWWISE_KERNELS", "1") != "0"}
# Programs per SM for row loops with partial sums (tuned on the device; docs/kernels.md).
PROGRAMS_PER_SM = {"value": 4}


def use_kernels(t: torch.Tensor) -> bool:
    """True when the Triton path should handle ``t`` (a CUDA tensor of a kernel dtype)."""
    return _state["enabled"] and HAVE_TRITON and t.is_cuda and t.dtype in KERNEL_DTYPES


@contextmanager
def kernels_disabled():
    """Run the torch reference path on every device inside the block."""
    old = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = old


def num_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a row loop with per-program partial sums: a few per SM on a
    GPU (enough to fill it, few partials to reduce), few under the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, PROGRAMS_PER_SM["value"] * sms))
    return max(1, min(n_rows, 4))


def row_block(d: int) -> int:
    """Power-of-two block that holds a whole row of ``d`` elements."""
    return 1 << max(0, (d - 1).bit_length())


def warps_for(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16
