"""Fresh weights for a model split on the meta device: each process allocates
and fills only its own shards.

Built whole, a model costs every process all of its fp32 weights before FSDP2
or tensor parallelism split it (282 GB at 70B). Built on the meta device and
parallelized there (``fully_shard`` and ``parallelize_module`` take meta
modules), it is then allocated shard by shard (``to_empty``) and filled from
:func:`centrifuge.models.llama.initial_parameters`: the one-process
initialization of the run's seed, drawn one full parameter at a time on the
CPU, of which each process keeps its own shard. The weights are therefore
those of ``build_model(config, seed=seed)`` on any layout.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from centrifuge.models import LlamaForCausalLM
from centrifuge.models.llama import initial_parameters


def materialize(model: LlamaForCausalLM, device: torch.device, seed: int) -> None:
    """Allocate ``model`` — built on the meta device, then parallelized — on
    ``device`` and give it ``build_model(model.config, seed=seed)``'s weights:
    each DTensor parameter gets its local shard (fp32 masters under FSDP2's
    mixed precision; the values cast to the parameter's dtype), a plain one the
    whole tensor. Beyond its shards a process holds one full parameter at a
    time on the CPU and, while it is split, up to two copies of it on
    ``device`` (the full tensor moved there and its parts, which a 2-D
    tp x FSDP split copies whole). Every process draws the whole stream of
    torch's default generator (as ``build_model`` does: the time of the whole
    one-process initialization) and runs no collective."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("materialize takes a model built on the meta device "
                         "(with torch.device('meta'): LlamaForCausalLM(config))")  # fmt: skip
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in initial_parameters(model.config, seed):
            p = params[name]
            if isinstance(p, DTensor):
                # src_data_rank=None: split locally; every rank holds the same full tensor.
                shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
                del shard
            else:
                p.copy_(full)
            del full  # before the next one is drawn
    model.reset_buffers(device)
