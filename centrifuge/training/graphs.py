"""``centrifuge train --cuda-graphs``: micro-batches and the update replayed from CUDA graphs.

A micro-batch's shapes follow from a few host-known numbers: the kept count
(from the CPU labels), the context and ranked rows, the document count and the
backward options of the step. Batches that agree on them — its *signature* —
share one captured step (:class:`~centrifuge.cuda_graphs.GraphedStep`): each
batch is copied into fixed buffers and the graph replays. The document bounds
are padded to a power-of-two capacity (:meth:`Layout.padded`), so the document
count enters the signature only through that bucket. A new signature is
captured on first sight (one eager warm-up pass, then the capture); all
micro-batch captures share one memory pool and the gradients they accumulate
into.

The optimizer update — clipping, the fused AdamW step, zeroing the gradients in
place — is one more graph (:class:`CapturedUpdate`): the first step's update
runs eagerly (AdamW creates its state on its first step), the second is
captured, and later steps replay it. The learning rate reaches the graph
through 0-dim device tensors that every step refills from the scheduler's
floats, so the schedule needs no recapture and the parameter groups, the
scheduler and the checkpoints hold what an eager run's hold. So a captured step
is: replay its micro-batches, replay the update, ``sched.step()`` eagerly.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from centrifuge.cuda_graphs import GraphedStep, StaticInputs
from centrifuge.plan import Layout


def why_not_captured(world_size: int, select: str, backward) -> str | None:
    """Why a run on a CUDA device cannot replay its micro-batches (None: it can).
    backward: the run's BackwardOptions."""
    if world_size > 1:
        return "several processes run eagerly (their gradient all-reduce is not captured)"
    if select == "random":
        return "random selection draws on a CPU generator, which a replay cannot repeat"
    if backward.extra > 0:
        return "sampled extra rows (backward extra) are drawn on a CPU generator and indexed with host syncs"
    return None


def why_update_not_captured(opt: torch.optim.Optimizer) -> str | None:
    """Why a captured run's optimizer update cannot be replayed (None: it can).
    The run builds fused AdamW; a resumed state brings the saving run's
    parameter groups, and a run on the CPU or on several processes saved foreach
    AdamW's, whose step counts live on the host."""
    if not all(group["fused"] for group in opt.param_groups):
        return "the optimizer state was resumed from a run on the CPU or on several processes (foreach AdamW)"
    return None


def capacity(n_docs: int) -> int:
    """The padded size of ``cu_seqlens`` for ``n_docs`` documents: the next power of two."""
    return 1 << n_docs.bit_length()


class CapturedMicroBatches:
    """The captured micro-batch steps of one run.

    max_graphs: captures kept at most; a batch of a new signature beyond it runs
    eagerly (``run`` returns None), and ``note`` says so once."""

    def __init__(self, params, device: torch.device, max_graphs: int = 64):
        self.params = [p for p in params if p.requires_grad]
        self.inputs = StaticInputs(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.steps: dict[tuple, GraphedStep] = {}
        self.max_graphs = max_graphs
        self.replays = self.eager = 0
        self.note: str | None = None  # said once by the caller, then cleared

    def layout(self, layout: Layout) -> tuple[int, Layout]:
        """(capacity, the layout padded to it in fixed device buffers) of a host layout."""
        cap = capacity(layout.cu_seqlens.numel() - 1)
        padded = layout.padded(cap)
        buf = self.inputs.update(position_ids=padded.position_ids, segment_ids=padded.segment_ids,
                                 **{f"cu_seqlens_{cap}": padded.cu_seqlens})  # fmt: skip
        return cap, Layout(buf["position_ids"], buf["segment_ids"], buf[f"cu_seqlens_{cap}"], padded.max_seqlen)

    def run(self, signature: tuple, step: Callable[[], tuple]) -> tuple | None:
        """Replay the step of ``signature`` (capturing ``step`` first if new): its
        outputs, gradients accumulated into ``p.grad``. ``step`` reads the
        buffers filled with :meth:`update` / :meth:`layout`. None: not captured
        (the cache is full), run the batch eagerly."""
        graph = self.steps.get(signature)
        if graph is None:
            if len(self.steps) >= self.max_graphs:
                self.eager += 1
                if self.eager == 1:
                    self.note = (f"CUDA graphs: more than {self.max_graphs} micro-batch shapes (kept, "
                                 "context or document counts vary); new ones run eagerly")  # fmt: skip
                return None
            graph = self.steps[signature] = GraphedStep(step, self.params, accumulate=True, pool=self.pool,
                                                        warmup=1)  # fmt: skip
        self.replays += 1
        outputs = graph.forward()
        graph.backward()
        return outputs

    def counts(self) -> dict:
        """Captured signatures, micro-batches replayed, and those run eagerly."""
        return dict(captured=len(self.steps), replayed=self.replays, eager=self.eager)

    def update(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copy a batch's tensors into the fixed buffers; returns the buffers by name."""
        return self.inputs.update(**tensors)


class CapturedUpdate:
    """The optimizer update of a captured run, replayed from one CUDA graph.

    update: clips the gradients, steps ``opt`` (fused AdamW, see
    :func:`why_update_not_captured`) and zeroes the gradients in place; returns
    their total norm (a device scalar, no host sync: what the graph outputs).
    device: the parameters' device.

    A capture runs nothing, and AdamW creates its state on its first step: the
    first call runs ``update`` eagerly — a real step, and the warm-up of every
    kernel the capture records — the second captures it and replays the capture
    as that step's update, later calls replay. No step is taken twice or thrown
    away, so the weights and the state follow the eager run's."""

    def __init__(self, opt: torch.optim.Optimizer, update: Callable[[], torch.Tensor], device: torch.device):
        self.opt, self.update = opt, update
        # Fused AdamW reads a device lr as float32.
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in opt.param_groups]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.norm: torch.Tensor | None = None
        self.calls = self.replays = 0

    def __call__(self) -> torch.Tensor:
        """This step's update; the norm is valid until the next call."""
        # This step's lrs, as the scheduler set them (a fill, no host-to-device copy).
        for lr, group in zip(self.lrs, self.opt.param_groups):
            lr.fill_(group["lr"])
        self.calls += 1
        if self.calls == 1:  # the same device lrs as the replays: the same kernels and rounding
            with self._device_lrs(capturable=False):
                return self.update()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            # A pool of its own: it holds a few scalars, and no other graph's replay can reach its output.
            with self._device_lrs(capturable=True), torch.cuda.graph(graph):
                self.norm = self.update()
            self.graph = graph
        self.graph.replay()
        self.replays += 1
        return self.norm

    @contextlib.contextmanager
    def _device_lrs(self, capturable: bool):
        """Inside, the parameter groups hold the device lrs (and ``capturable``,
        which AdamW demands under capture). Outside they hold an eager run's
        values, so a captured run's checkpoint is an eager run's: float lrs,
        which the scheduler writes and its state saves (tensor lrs would put
        device tensors in both, and a loaded 0-dim tensor lands on the CPU),
        and ``capturable`` off (on, an eager run resuming it would warn)."""
        groups = self.opt.param_groups
        saved = [(group["lr"], group["capturable"]) for group in groups]
        for group, lr in zip(groups, self.lrs):
            group.update(lr=lr, capturable=capturable)
        try:
            yield
        finally:
            for group, (lr, was) in zip(groups, saved):
                group.update(lr=lr, capturable=was)
