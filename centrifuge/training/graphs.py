"""``centrifuge train --cuda-graphs``: micro-batches replayed from CUDA graphs.

A micro-batch's shapes follow from a few host-known numbers: the kept count
(from the CPU labels), the context and ranked rows, the document count and the
backward options of the step. Batches that agree on them — its *signature* —
share one captured step (:class:`~centrifuge.cuda_graphs.GraphedStep`): each
batch is copied into fixed buffers and the graph replays. The document bounds
are padded to a power-of-two capacity (:meth:`Layout.padded`), so the document
count enters the signature only through that bucket. A new signature is
captured on first sight (one eager warm-up pass, then the capture); all
captures share one memory pool and the gradients they accumulate into.
"""

from __future__ import annotations

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
    if backward.kv_projections and backward.path != "dense":
        return "kv_projections on the compact path counts its key rows with a host sync"
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
