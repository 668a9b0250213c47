"""The process group of a run started by ``torchrun`` (or a single process).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one
process and every collective below is a no-op, so the training code has one
path for both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from centrifuge.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """rank, world_size: this process and the number of processes;
    device: the device this process computes on (``cuda:LOCAL_RANK`` on GPUs);
    tp: tensor-parallel ranks, consecutive processes that split each layer and
    read the same micro-batches; mesh: the 2-D DeviceMesh ("dp", "tp") when tp > 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    tp: int = 1
    mesh: object = None

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: processes that read different micro-batches."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all processes (in place; returns ``t``)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` (picklable), in rank order, on rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (a picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", tp: int = 1) -> DistContext:
    """Join the process group torchrun set up (once per process) and pick this
    process's device: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is
    there (NCCL), else the CPU (gloo). A plain ``python`` start gives a
    one-process context on ``device``. tp > 1: tensor parallelism over groups
    of tp consecutive processes (a 2-D mesh: data-parallel x tensor-parallel)."""
    if not _launched_by_torchrun():
        if tp != 1:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {tp} x N processes: start "
                             f"the run with torchrun --nproc-per-node {tp}")  # fmt: skip
        return DistContext(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if tp < 1 or world % tp:
        raise ValueError(f"tp {tp} must divide the {world} processes (tp x data-parallel replicas)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    kind = resolve_device(device).type
    if kind == "cuda":
        if device not in ("auto", "cuda"):
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; use --device "
                             f"cuda or auto, not {device!r}")  # fmt: skip
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are "
                             "visible: start at most one process per GPU")  # fmt: skip
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=dev if kind == "cuda" else None)
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return DistContext(rank, world, dev, tp, mesh)


def shutdown_distributed() -> None:
    """Leave the process group together. A barrier alone is not enough for gloo:
    the first process out of it may close its sockets while a peer still
    finishes the barrier's last exchange, and gloo aborts that peer. So every
    process also checks in at torchrun's store (no gloo sockets) and waits
    until all have, i.e. until every gloo operation has returned everywhere."""
    if not dist.is_initialized():
        return
    dist.barrier()
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    store.add("centrifuge/shutdown", 1)
    store.wait(["centrifuge/shutdown"])
    while int(store.add("centrifuge/shutdown", 0)) < world:
        time.sleep(0.005)
    dist.destroy_process_group()

