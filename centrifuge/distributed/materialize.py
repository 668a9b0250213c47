"""Weights for a model split on the meta device: each process allocates and
fills only its own shards.

Built or loaded whole, a model costs every process all of its fp32 weights
before FSDP2 or tensor parallelism split it (282 GB at 70B). Built on the meta
device and parallelized there (``fully_shard`` and ``parallelize_module`` take
meta modules), it is then allocated shard by shard (``to_empty``) and filled
from a stream of parameters, one at a time on the CPU, of which each process
takes only its own block: :func:`centrifuge.models.llama.initial_parameters`
(full tensors: the one-process initialization of the run's seed, so that the
weights are those of ``build_model(config, seed=seed)`` on any layout) or
:func:`centrifuge.models.llama.checkpoint_parameters` (a checkpoint directory's
tensors, of which only the block indexed is read from disk).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from centrifuge.models import LlamaForCausalLM
from centrifuge.models.llama import StoredTensor


def materialize(model: LlamaForCausalLM, device: torch.device,
                source: Iterable[tuple[str, torch.Tensor | StoredTensor]]) -> None:  # fmt: skip
    """Allocate ``model`` — built on the meta device, then parallelized — on
    ``device`` and fill it from ``source``: (name, full CPU tensor or a
    :class:`StoredTensor`) for every parameter of ``named_parameters()``, one at
    a time. Each DTensor parameter gets its local shard (fp32 masters under
    FSDP2's mixed precision; the values cast to the parameter's dtype), a plain
    one the whole tensor: ``source`` is indexed once per parameter, by the
    smallest block that holds this process's part (the part itself unless a
    ``_StridedShard`` layout's rows are not contiguous), so that a checkpoint is
    read a shard at a time. Beyond its shards a process holds the full parameter
    that a tensor ``source`` gives, or only the block that a checkpoint's gives
    (cast when the file's dtype differs, and its rows picked when they are not
    contiguous). It runs no collective."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("materialize takes a model built on the meta device "
                         "(with torch.device('meta'): LlamaForCausalLM(config))")  # fmt: skip
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    unfilled = set(params)
    with torch.no_grad():
        for name, stored in source:
            p = params[name]
            part = p.to_local() if isinstance(p, DTensor) else p
            if part.numel():  # an uneven split may leave a process no rows
                part.copy_(_read_part(stored, _held_indices(p)))
            unfilled.discard(name)
            del stored  # before the next one is drawn or read
    if unfilled:  # left uninitialized memory: a source that does not match the model
        raise ValueError(f"materialize: the source gave no tensor for {sorted(unfilled)[:5]}")
    model.reset_buffers(device)


def _read_part(stored: torch.Tensor | StoredTensor, held: list[torch.Tensor]) -> torch.Tensor:
    """The part of ``stored`` (a whole tensor, or a checkpoint's) at the indices
    ``held`` of each dimension (not empty): ``stored`` is indexed once, by the
    smallest block that holds them, of which the part's rows are then picked
    where they are not contiguous."""
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in held)
    block = stored[box]
    for d, (i, b) in enumerate(zip(held, box, strict=True)):
        if not torch.equal(i, torch.arange(b.start, b.stop)):
            block = block.index_select(d, i - b.start)
    return block


def _held_indices(p: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension of ``p`` (its global shape), the indices of the whole
    tensor that this process's part holds, in the part's order (CPU int64): all
    of them for a plain tensor. For a DTensor they are what
    ``distribute_tensor`` keeps of each dimension's index range split alone —
    the mesh dimensions that shard another dimension replicate it — so a part
    read by these indices equals the split of the whole tensor bit for bit, on
    any layout, uneven and ``_StridedShard`` ones included."""
    if not isinstance(p, DTensor):
        return [torch.arange(n) for n in p.shape]
    held = []
    for d, n in enumerate(p.shape):
        along = [_along(pl, d) for pl in p.placements]
        split = distribute_tensor(torch.arange(n), p.device_mesh, along, src_data_rank=None)
        held.append(split.to_local().cpu())
    return held


def _along(placement, d: int):
    """``placement`` as it acts on dimension ``d`` of a tensor, for the 1-D
    index range of that dimension: its split when it shards ``d``, else none."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor) if placement.dim == d else Replicate()
    if isinstance(placement, Shard):
        return Shard(0) if placement.dim == d else Replicate()
    if isinstance(placement, Replicate):
        return placement
    raise ValueError(f"materialize supports Shard, _StridedShard and Replicate placements, "
                     f"not {placement}")
