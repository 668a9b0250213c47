"""Weights for a model split on the meta device: each process allocates and
fills only its own shards.

Built or loaded whole, a model costs every process all of its fp32 weights
before FSDP2 or tensor parallelism split it (282 GB at 70B). Built on the meta
device and parallelized there (``fully_shard`` and ``parallelize_module`` take
meta modules), it is then allocated shard by shard (``to_empty``) and filled
from a stream of full parameters, one at a time on the CPU, of which each
process keeps its own shard: :func:`centrifuge.models.llama.initial_parameters`
(the one-process initialization of the run's seed, so that the weights are
those of ``build_model(config, seed=seed)`` on any layout) or
:func:`centrifuge.models.llama.checkpoint_parameters` (a checkpoint directory's,
read tensor by tensor).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from centrifuge.models import LlamaForCausalLM


def materialize(model: LlamaForCausalLM, device: torch.device,
                source: Iterable[tuple[str, torch.Tensor]]) -> None:  # fmt: skip
    """Allocate ``model`` — built on the meta device, then parallelized — on
    ``device`` and fill it from ``source``: (name, full tensor on the CPU) for
    every parameter of ``named_parameters()``, one at a time. Each DTensor
    parameter gets its local shard (fp32 masters under FSDP2's mixed precision;
    the values cast to the parameter's dtype), a plain one the whole tensor.
    Beyond its shards a process holds the full parameter that ``source`` gives
    and, while it is split, up to two copies of it on ``device`` (the full tensor
    moved there and its parts, which a 2-D tp x FSDP split copies whole). It runs
    no collective: every process reads the whole of ``source``."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("materialize takes a model built on the meta device "
                         "(with torch.device('meta'): LlamaForCausalLM(config))")  # fmt: skip
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    unfilled = set(params)
    with torch.no_grad():
        for name, full in source:
            p = params[name]
            if isinstance(p, DTensor):
                # src_data_rank=None: split locally; every rank holds the same full tensor.
                shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
                del shard
            else:
                p.copy_(full)
            unfilled.discard(name)
            del full  # before the next one is read
    if unfilled:  # left uninitialized memory: a source that does not match the model
        raise ValueError(f"materialize: the source gave no tensor for {sorted(unfilled)[:5]}")
    model.reset_buffers(device)
