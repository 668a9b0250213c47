"""Tensor parallelism (with sequence parallelism) for the native model, on a
DeviceMesh dimension ``tp``.

The weights are distributed with PyTorch's own styles (``parallelize_module``:
ColwiseParallel for wq, wk, wv, wg, wu, RowwiseParallel for wo, wd,
SequenceParallel for the norms) and become DTensors; the module forwards those
styles hook are never called, since a decoder layer is one autograd Function
that reads its weights' local shards and does its own collectives
(``centrifuge.models.tensor_parallel``). The embedding, the final norm and the
LM head are replicated: each rank looks up, normalizes and scores its own rows
(sequence parallel), and the per-row losses are all-gathered.

Replicated weights therefore get a partial gradient on each rank (from its own
rows; the q/k norms from its own heads): :func:`reduce_replicated_grads` sums
them over the tensor-parallel ranks once per step, before clipping.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module,
)  # fmt: skip

from centrifuge.models import LlamaForCausalLM
from centrifuge.models.layer import layer_weights
from centrifuge.models.tensor_parallel import TPGroup

_LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
    "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(),
    "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
}  # fmt: skip


def check_tensor_parallel(model, tp: int) -> None:
    """Raise unless ``model`` can be split over ``tp`` ranks: the native model
    (a patched transformers model is not supported under tensor parallelism),
    heads, KV heads and the MLP width divisible by tp, no LoRA adapters."""
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"tensor parallelism supports Centrifuge's native model (centrifuge "
                        f"train), not a {type(model).__name__}: train a patched transformers "
                        "model with DDP or FSDP")  # fmt: skip
    c = model.config
    for what, n in (("attention heads", c.num_heads), ("key/value heads", c.num_kv_heads),
                    ("intermediate_size", c.intermediate_size)):  # fmt: skip
        if n % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks splits the {what} ({n}): "
                             f"choose a tp that divides {n}")  # fmt: skip
    for layer in model.model.layers:
        w, _ = layer_weights(layer)
        if any(v is not None for k, v in w.items() if "_lora_" in k):
            raise NotImplementedError("LoRA adapters are not supported under tensor parallelism")


def apply_tensor_parallel(model: LlamaForCausalLM, mesh) -> LlamaForCausalLM:
    """Split ``model`` in place over the 1-D DeviceMesh ``mesh`` (the ``tp``
    dimension; consecutive ranks). Every rank must hold the same weights."""
    tp = mesh.size()
    check_tensor_parallel(model, tp)
    group = TPGroup(mesh.get_group(), tp, mesh.get_local_rank())
    for layer in model.model.layers:
        plan = dict(_LAYER_PLAN)
        if hasattr(layer.self_attn, "q_norm"):  # per head: the same weights on every rank
            plan.update({f"self_attn.{n}": SequenceParallel() for n in ("q_norm", "k_norm")})
        parallelize_module(layer, mesh, plan)
        s = layer.shape
        layer.shape = dataclasses.replace(s, num_heads=s.num_heads // tp,
                                          num_kv_heads=s.num_kv_heads // tp, tp=group)  # fmt: skip
    for m in (model.model.embed_tokens, model.model.norm, model.lm_head):
        distribute_module(m, mesh)  # replicated
    if model.config.tie_word_embeddings:  # distributing each module untied them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.tp = group
    return model


def _replicated_over_tp(p: torch.Tensor) -> bool:
    if not isinstance(p, DTensor) or "tp" not in (p.device_mesh.mesh_dim_names or ()):
        return False
    return isinstance(p.placements[p.device_mesh.mesh_dim_names.index("tp")], Replicate)


def reduce_replicated_grads(model: LlamaForCausalLM) -> None:
    """Sum the partial gradients of the weights replicated over the
    tensor-parallel ranks (norms, embedding, LM head), in one all-reduce;
    a no-op without tensor parallelism. Call once per step, after the last
    backward (a linear sum: after FSDP's or DDP's reduction is as good)."""
    if model.tp is None:
        return
    grads = [p.grad.to_local() for p in model.parameters()
             if p.grad is not None and _replicated_over_tp(p)]  # fmt: skip
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=model.tp.group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
