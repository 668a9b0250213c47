"""Attention output of given query rows, from the forward's saved softmax statistics.

Activation checkpointing with the compact backward recomputes a decoder layer on
its kept rows only: K and V for every row (the attention backward reads every
key), everything else for the kept rows. The attention output of a kept query i
over all visible keys j needs no second softmax pass when the forward's
log-normalizer ``lse_i`` was saved:

    o_i = sum_j exp(q_i . k_j * scale - lse_i) v_j

one pass over the keys with the structure of the dQ kernel of the filtered
backward. Layout as in :mod:`centrifuge.ops.attention`: q compact [n, H, D]
(rows ``idx``, sorted flat indices into B*L), k, v [B, L, Hkv, D],
lse [B, H, L] float32 (float64 for float64 inputs; any strides).

:func:`attention_forward_rows` dispatches: the Triton kernel of
``attention_recompute_triton`` on CUDA, the reference below elsewhere.
"""

from __future__ import annotations

import torch

from centrifuge.ops.attention import _acc_dtype, _gpu_kernels_available, _mask, _repeat_kv, rows_by_batch
from centrifuge.plan import Layout


def attention_forward_rows_reference(q, k, v, lse, layout: Layout, idx: torch.Tensor, scale=None):
    """q: [n, H, D] (rows idx), k, v: [B, L, Hkv, D], lse: [B, H, L] -> o [n, H, D] in q.dtype.
    One batch row at a time, so memory stays at [H, n_b, L]."""
    B, L, Hkv, D = k.shape
    H = q.shape[1]
    groups = H // Hkv
    scale = D**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    o = torch.empty_like(q)
    for b, lo, hi, t in rows_by_batch(idx, B, L):
        seg = layout.segment_ids[b]
        kh = _repeat_kv(k[b], groups, 1).transpose(0, 1).to(acc)  # [H, L, D]
        vh = _repeat_kv(v[b], groups, 1).transpose(0, 1).to(acc)
        s = (q[lo:hi].transpose(0, 1).to(acc) @ kh.transpose(-1, -2)) * scale  # [H, nb, L]
        visible = _mask(seg[t], t, seg)[None]
        p = torch.where(visible, torch.exp(s - lse[b][:, t, None].to(acc)), 0.0)
        o[lo:hi] = (p @ vh).transpose(0, 1).to(q.dtype)
    return o


def _check(q, k, v, lse, layout: Layout, idx):
    B, L, Hkv, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() != 3 or q.shape[0] != idx.numel() or q.shape[2] != D or q.shape[1] % Hkv:
        raise ValueError(
            f"q must be [n_rows, H, {D}] with H a multiple of {Hkv} and n_rows = {idx.numel()} "
            f"(the rows of idx), got {tuple(q.shape)}"
        )
    if lse.shape != (B, q.shape[1], L):
        raise ValueError(f"lse must be [B, H, L] = {(B, q.shape[1], L)}, got {tuple(lse.shape)}")
    if layout.shape != (B, L):
        raise ValueError(f"layout is for shape {layout.shape}, k and v are {(B, L)}")


def attention_forward_rows(q, k, v, lse, layout: Layout, idx: torch.Tensor, scale=None):
    """Attention output of the query rows ``idx`` (sorted flat indices into B*L)
    from the saved ``lse``. q: [n, H, D], k, v: [B, L, Hkv, D], lse: [B, H, L].
    Returns o [n, H, D] in q.dtype."""
    _check(q, k, v, lse, layout, idx)
    if _gpu_kernels_available(q) and q.dtype != torch.float64:
        from centrifuge.ops.attention_recompute_triton import attention_forward_rows_triton

        return attention_forward_rows_triton(q, k, v, lse, layout, idx, scale)
    return attention_forward_rows_reference(q, k, v, lse, layout, idx, scale)
