"""A training step's forward and backward captured as CUDA graphs and replayed.

Why: below ~2·10¹¹ tokens × layer parameters a step is bound by the host, which
issues ~1,500 kernels per step while the device idles (docs/benchmarks.md,
"Small models"). When every shape of a step is known on the host — the kept
count from the CPU labels (``Selector.count``), the document layout built on
the host — nothing in the step waits for the device, so the whole step can be
recorded once and replayed with one launch per graph.

What a captured step needs, and where it falls back: its inputs live at fixed
addresses (the caller copies each batch into them, :class:`StaticInputs`); no
host sync and no host-to-device copy from pageable memory inside it; random
draws on the device's generator (the CPU generators of ``random`` selection and
of the sampled extra rows cannot be replayed). The callers check those
conditions and run eagerly otherwise, saying so once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from centrifuge.ops import clear_step_caches


def use_compact_path(backward) -> None:
    """A captured step's ``auto`` path is ``compact``: ``auto`` takes the dense one
    for small models because kernel launches set their pace, and a replayed step
    launches one graph (captured byte-110m at 16 x 512: compact 0.74x dense,
    docs/benchmarks.md). backward: a BackwardOptions, changed in place."""
    if backward.mode == "amplified" and backward.path == "auto":
        backward.path = "compact"


class GraphedStep:
    """``forward`` (inputs to ``(loss, *outputs)``) and ``loss.backward()``, captured
    as two CUDA graphs that share one memory pool; replays run the same kernels on
    whatever the input tensors hold.

    forward: a function of no arguments reading tensors at fixed addresses;
        returns a tuple whose first entry is the scalar to differentiate, the rest
        outputs to read after a replay (e.g. loss sums for logging).
    params: the parameters whose ``.grad`` the backward fills.
    accumulate: False — each backward writes fresh gradients (the captured
        tensors are attached to ``p.grad`` after every replay, as an eager
        backward after ``zero_grad(set_to_none=True)`` would); True — it adds to
        ``p.grad`` (allocated here if None), the same tensors for every step
        captured this way (gradient accumulation: the caller zeroes them in
        place, ``zero_grad(set_to_none=False)``, and never replaces them).
    pool: a memory pool shared with other captured steps that never run
        interleaved (``torch.cuda.graph_pool_handle()``), None for a private one.
        In a shared pool a step's outputs (and gradients it writes fresh) are
        valid until another step of the pool replays: read them before.
    warmup: eager runs before capture on a side stream (Triton compiles and
        every lazily built cache fills there, outside the graph).
    """

    def __init__(self, forward: Callable[[], tuple], params: Sequence[torch.nn.Parameter],
                 accumulate: bool = False, pool=None, warmup: int = 2):  # fmt: skip
        self.params = [p for p in params if p.requires_grad]
        self.accumulate = accumulate
        # The warm-up adds to the gradients: keep what a step has summed so far.
        pending = [None if p.grad is None else p.grad.clone() for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward()[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            if not accumulate:
                p.grad = None  # the capture allocates them, in the pool
            elif p.grad is None:  # outside the pool: they outlive every replay
                p.grad = torch.zeros_like(p)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        clear_step_caches()  # built inside the capture, not read from the warm-up's batch
        with torch.cuda.graph(self.fwd, pool=pool):
            self.outputs = forward()
        with torch.cuda.graph(self.bwd, pool=self.fwd.pool()):
            self.outputs[0].backward()
        clear_step_caches()  # their tensors now belong to the pool and change with every replay
        self.grads = [p.grad for p in self.params]
        for p, g in zip(self.params, pending):  # capturing ran nothing: restore the sums
            if not accumulate:
                p.grad = g
            elif g is None:
                p.grad.zero_()
            else:
                p.grad.copy_(g)

    def forward(self) -> tuple:
        """Replay the forward; returns the captured output tensors (now refilled)."""
        self.fwd.replay()
        return self.outputs

    def backward(self) -> None:
        """Replay the backward (after :meth:`forward`); the gradients land in ``p.grad``."""
        self.bwd.replay()
        if not self.accumulate:
            for p, g in zip(self.params, self.grads):
                p.grad = g


class StaticInputs:
    """Device buffers at fixed addresses that a captured step reads: each batch
    is copied into them before a replay. ``update`` takes tensors of the shapes
    and dtypes of the first call (CPU or device); returns the buffers by name."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def update(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, t in tensors.items():
            buf = self.buffers.get(name)
            if buf is None:
                self.buffers[name] = buf = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            elif buf.shape != t.shape or buf.dtype != t.dtype:
                raise ValueError(f"{name} changed from {tuple(buf.shape)} {buf.dtype} to "
                                 f"{tuple(t.shape)} {t.dtype}: a captured step has fixed shapes")  # fmt: skip
            if t.device.type == "cpu" and self.device.type == "cuda":
                t = t.pin_memory()  # from pageable memory the copy would wait for the device
            buf.copy_(t, non_blocking=True)
        return dict(self.buffers)
