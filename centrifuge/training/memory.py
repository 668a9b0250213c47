"""A first estimate of a run's memory, checked before anything runs: a
micro-batch that cannot fit fails with a message, not with the kernel's
out-of-memory kill halfway through the first step."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from centrifuge.models import ModelConfig

GIB = 2**30


def estimate_bytes(mc: ModelConfig, tokens: int, dtype: str, checkpointing: bool,
                   parameter_shards: int = 1) -> int:  # fmt: skip
    """A low estimate of one process's peak during a training step: weights,
    gradients and AdamW's two moments (16 bytes a parameter, sharded over
    ``parameter_shards`` processes under FSDP) plus what the forward keeps for
    the backward for ``tokens`` tokens. Per token and layer that is about
    5.5 hidden + 2 intermediate values (44 KB for TinyLlama in bf16, as
    measured; the CPU measured 1.5-2x this), the layer input alone with
    activation checkpointing; plus two vocabulary-wide rows for the loss."""
    h, f, v = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    per_layer = h if checkpointing else (11 * h + 4 * f) // 2
    element = 2 if dtype == "bf16" else 4
    activations = tokens * element * (mc.num_layers * per_layer + 2 * v)
    return 16 * mc.num_parameters() // parameter_shards + activations


def available_bytes(device: torch.device) -> int | None:
    """Memory this process may still take on ``device`` (None: unknown). On the
    CPU: the system's available memory (or the container's limit, if lower),
    shared by the processes torchrun started on this host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # cgroup v2: a container's own limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and avail is not None:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    if avail is None:
        return None
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_memory(mc: ModelConfig, cfg, device: torch.device, parameter_shards: int = 1) -> None:
    """Raise ValueError when a micro-batch of ``cfg`` cannot fit on ``device``
    by :func:`estimate_bytes`, a low estimate: only a run that surely does not
    fit is refused."""
    need = estimate_bytes(mc, cfg.batch_size * cfg.seq_len, cfg.dtype,
                          cfg.activation_checkpointing, parameter_shards)  # fmt: skip
    have = available_bytes(device)
    if have is not None and need > have:
        raise ValueError(
            f"a micro-batch of {cfg.batch_size} rows x {cfg.seq_len} tokens of {cfg.model} needs "
            f"at least about {need / GIB:.1f} GiB on {device} (estimated), but {have / GIB:.1f} "
            "GiB is available: lower --batch-size (and raise --grad-accum to keep the tokens "
            "of a step), lower --seq-len, or use --activation-checkpointing"
        )
