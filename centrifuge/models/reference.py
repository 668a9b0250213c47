"""The reference semantics, in plain differentiable PyTorch (docs/design.md).

Every attention layer uses ``k = where(backward_set, k, k.detach())`` (same
for v) with ``backward_set = keep | context | ranked`` (context rows: no target,
before a labelled row of their document; ranked rows: those the selection ranks
next, ``BackwardOptions.backward_ratio``), and the loss is averaged over the
kept rows only. ``keep=None`` gives ordinary autograd of
the same model: the masked-loss baseline that ``exact`` mode must reproduce.
The knobs of :class:`centrifuge.plan.BackwardOptions`: ``kv_weight`` (per-row
K/V gradient weights, ``Plan.kv_weight``: sampled filtered rows) replaces the
0/1 mask in the attention layers; the bottom ``exact_layers`` and the top
``exact_top`` detach nothing, and the input of the lowest top exact layer is
detached on the rows outside the backward set when a detaching layer lies
below it; ``kv_projections`` computes the K/V of the rows outside the backward
set from their detached layer input (live weights) instead of detaching them.
Tests hold the compact backward to these gradients; nothing fast lives here.
"""

from __future__ import annotations

import torch

from centrifuge.models.llama import LlamaForCausalLM, shift_targets
from centrifuge.ops.attention import attention_reference
from centrifuge.ops.linear_ce import IGNORE_INDEX, linear_cross_entropy_reference
from centrifuge.ops.rmsnorm import rms_norm_reference
from centrifuge.ops.rope import rope_cos_sin, rope_reference
from centrifuge.ops.swiglu import swiglu_reference
from centrifuge.plan import context_rows


def reference_token_loss(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    kv_weight: torch.Tensor | None = None,
    exact_layers: int = 0,
    context: str = "backward",
    exact_top: int = 0,
    kv_projections: bool = False,
    ranked: torch.Tensor | None = None,
):
    """Returns (token_loss [B, L], valid [B, L]) computed with plain autograd.

    keep: [B, L] bool, K/V of rows outside ``keep`` and the context rows detached
    (None: nothing detached); context: ``constant`` detaches context rows too;
    ranked: [B, L] bool rows without a loss whose K/V are not detached either;
    kv_weight: [B, L] float, used instead of ``keep`` in the attention layers
    (see ``attention_reference``); exact_layers, exact_top: the bottom and top
    layers that detach nothing; the input of layer ``num_layers - exact_top`` is
    detached on the rows outside the backward set (weight 0) when the layer
    below it detaches; kv_projections: in the detaching layers, the K/V of rows
    outside the backward set are computed from the layer input detached (live
    weights: norm, projections, k norm) and take gradient from every query."""
    c = model.config
    B, L = input_ids.shape
    layout = model.make_plan(input_ids, position_ids, attention_mask).layout
    targets = shift_targets(labels, layout, ignore_index)
    if attention_mask is not None:
        targets = targets.masked_fill(~attention_mask.bool(), ignore_index)
    valid = targets != ignore_index
    attn_keep = keep
    if keep is not None and context == "backward":
        attn_keep = keep | context_rows(valid, layout)
    if keep is not None and ranked is not None:
        attn_keep = attn_keep | ranked
    if kv_weight is not None:
        attn_keep = kv_weight
    x = model.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(layout.position_ids, model.inv_freq, x.dtype)
    cos, sin = cos.reshape(B * L, -1), sin.reshape(B * L, -1)
    hd = c.head_dim
    n_layers = len(model.model.layers)

    def detaching(i):  # layer i detaches (or weights) K/V outside the backward set
        return attn_keep is not None and exact_layers <= i < n_layers - exact_top

    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        if i > 0 and not detaching(i) and detaching(i - 1):  # the lowest top exact layer
            x = torch.where(attn_keep[..., None] != 0, x, x.detach())
        w_in = layer.input_layernorm.weight
        h = h_kv = rms_norm_reference(x, w_in, c.rms_norm_eps)
        layer_keep = attn_keep if detaching(i) else None
        if layer_keep is not None and kv_projections:
            # K/V of rows outside the backward set from their detached input, with
            # live weights; then every row is live in the attention (the outside
            # rows' own queries get no gradient anyway).
            outside = attn_keep[..., None] == 0
            h_kv = torch.where(outside, rms_norm_reference(x.detach(), w_in, c.rms_norm_eps), h)
            layer_keep = attn_keep.to(x.dtype).masked_fill(attn_keep == 0, 1.0)
        q = a.q_proj(h).view(B * L, c.num_heads, hd)
        k = a.k_proj(h_kv).view(B * L, c.num_kv_heads, hd)
        v = a.v_proj(h_kv).view(B, L, c.num_kv_heads, hd)
        if c.qk_norm:
            q = rms_norm_reference(q, a.q_norm.weight, c.rms_norm_eps)
            k = rms_norm_reference(k, a.k_norm.weight, c.rms_norm_eps)
        q = rope_reference(q, cos, sin).view(B, L, c.num_heads, hd)
        k = rope_reference(k, cos, sin).view(B, L, c.num_kv_heads, hd)
        o = attention_reference(q, k, v, layout.segment_ids, layer_keep)
        x = x + a.o_proj(o.reshape(B, L, -1))
        h = rms_norm_reference(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        m = layer.mlp
        x = x + m.down_proj(swiglu_reference(m.gate_proj(h), m.up_proj(h)))
    h = rms_norm_reference(x, model.model.norm.weight, c.rms_norm_eps)
    loss = linear_cross_entropy_reference(
        h.reshape(B * L, -1), model.lm_head.weight, targets.reshape(-1), ignore_index
    )
    return loss.view(B, L), valid


def reference_filtered_loss(model, input_ids, labels, keep, **kw) -> torch.Tensor:
    """Mean over kept rows, K/V of the rows outside the backward set detached (or
    weighted: ``kv_weight``, ``exact_layers``, ``exact_top``, ``kv_projections``;
    ``context``, ``ranked``) in the attention layers."""
    token_loss, _ = reference_token_loss(model, input_ids, labels, keep, **kw)
    return (token_loss * keep).sum() / keep.sum()
