"""Causal (packed-document) attention with the filtered backward.

Layout is token-major, the way projections produce it:
q: [B, L, H, D], k, v: [B, L, Hkv, D] (GQA: H = Hkv * G), o: [B, L, H, D],
lse: [B, H, L] float32 (the forward's softmax log-normalizer).
A query attends to keys of its own segment (document) at positions <= its own.

The filtered backward (docs/design.md): with K/V of filtered rows detached,
* dQ is needed for kept queries only, over all keys;
* dK, dV for kept keys only, from kept queries only.
Softmax statistics (lse, and Delta = rowsum(dO * O)) come from the dense forward.

On CUDA, ``attention_forward`` / ``attention_backward`` dispatch to the kernels of
``attention_triton`` (cuDNN forward for one-document rows, flash varlen forward
otherwise, Triton filtered backward); on CPU they run the references below,
which the kernels are tested against.
"""

from __future__ import annotations

import torch

from centrifuge.plan import ExtraRows, Layout


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def rows_by_batch(idx: torch.Tensor, B: int, L: int):
    """Walk sorted flat row indices ([n] into B*L) one batch row at a time:
    yields (b, lo, hi, t) for every row b holding some, where idx[lo:hi] are
    those rows and t their positions in row b."""
    bounds = torch.searchsorted(idx // L, torch.arange(B + 1, device=idx.device)).tolist()
    for b in range(B):
        lo, hi = bounds[b], bounds[b + 1]
        if lo < hi:
            yield b, lo, hi, idx[lo:hi] - b * L


def _mask(seg_q: torch.Tensor, pos_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """[nq, L] bool: key j visible to query i. pos_q are the queries' row positions."""
    keys = torch.arange(seg_k.numel(), device=seg_k.device)
    return (seg_q[:, None] == seg_k[None, :]) & (keys[None, :] <= pos_q[:, None])


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Differentiable reference. With ``keep`` ([B, L] bool) the K/V of filtered
    rows are detached: ``k = where(keep, k, k.detach())`` (the reference semantics, docs/design.md).

    ``keep`` may instead hold per-row K/V gradient weights w ([B, L] float): the
    gradient that K/V of row j receive from *other* rows' queries is multiplied
    by w_j, the one from row j's own query (the diagonal) is not, and rows with
    w_j = 0 are constants altogether. 0/1 weights are the bool mask. The forward
    value never changes.
    """
    B, L, H, D = q.shape
    groups = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    own_k = own_v = None
    if keep is not None:
        w = keep.to(k.dtype)[:, :, None, None]
        live = keep[:, :, None, None] != 0
        k_own, v_own = torch.where(live, k, k.detach()), torch.where(live, v, v.detach())
        # Value k, gradient w * dk: K/V as seen by other rows' queries.
        k = k.detach() + w * (k - k.detach())
        v = v.detach() + w * (v - v.detach())
        # Zero-valued differences that route the diagonal's gradient at weight 1.
        own_k, own_v = k_own - k, v_own - v
    qh = q.transpose(1, 2)
    kh = _repeat_kv(k, groups, 2).transpose(1, 2)
    vh = _repeat_kv(v, groups, 2).transpose(1, 2)
    pos = torch.arange(L, device=q.device)
    mask = torch.stack([_mask(segment_ids[b], pos, segment_ids[b]) for b in range(B)])
    s = (qh @ kh.transpose(-1, -2)).to(_acc_dtype(q.dtype)) * scale
    if own_k is not None:
        diag = (qh * _repeat_kv(own_k, groups, 2).transpose(1, 2)).sum(-1) * scale  # [B, H, L]
        s = s + torch.diag_embed(diag.to(s.dtype))
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    o = p @ vh
    if own_v is not None:
        p_own = torch.diagonal(p, dim1=-2, dim2=-1)[..., None]  # [B, H, L, 1]
        o = o + p_own * _repeat_kv(own_v, groups, 2).transpose(1, 2)
    return o.transpose(1, 2)


def attention_forward_reference(q, k, v, layout: Layout, scale: float | None = None):
    """Returns (o [B, L, H, D], lse [B, H, L] float32). One batch row at a time
    so memory stays at [H, L, L]."""
    B, L, H, D = q.shape
    groups = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=acc)
    pos = torch.arange(L, device=q.device)
    for b in range(B):
        seg = layout.segment_ids[b]
        kh = _repeat_kv(k[b], groups, 1).transpose(0, 1)  # [H, L, D]
        vh = _repeat_kv(v[b], groups, 1).transpose(0, 1)
        s = (q[b].transpose(0, 1) @ kh.transpose(-1, -2)).to(acc) * scale  # [H, L, L]
        s = s.masked_fill(~_mask(seg, pos, seg)[None], float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - m[..., None]).to(q.dtype)
        o[b] = (p @ vh).transpose(0, 1)
        lse[b] = m
    return o, lse


def attention_backward_reference(
    q, k, v, o, lse, do, layout: Layout, keep_idx: torch.Tensor | None, scale: float | None = None
):
    """Filtered attention backward.

    do: [n, H, D], the output gradient of the kept rows ``keep_idx`` ([n] sorted
    flat indices into B*L; None = every row, i.e. dense training).
    Returns dq [n, H, D], dk [n, Hkv, D], dv [n, Hkv, D] for those rows.
    """
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    groups = H // Hkv
    scale = D**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    if keep_idx is None:
        keep_idx = torch.arange(B * L, device=q.device)
    n = keep_idx.numel()
    dq = torch.empty(n, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(n, Hkv, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(n, Hkv, D, device=q.device, dtype=v.dtype)
    for b, lo, hi, t in rows_by_batch(keep_idx, B, L):
        seg = layout.segment_ids[b]
        qk = q[b, t].transpose(0, 1).to(acc)  # [H, nb, D]
        kh = _repeat_kv(k[b], groups, 1).transpose(0, 1).to(acc)  # [H, L, D]
        vh = _repeat_kv(v[b], groups, 1).transpose(0, 1).to(acc)
        dob = do[lo:hi].transpose(0, 1).to(acc)  # [H, nb, D]
        s = (qk @ kh.transpose(-1, -2)) * scale
        visible = _mask(seg[t], t, seg)[None]
        p = torch.where(visible, torch.exp(s - lse[b][:, t, None].to(acc)), 0.0)
        delta = (dob * o[b, t].transpose(0, 1).to(acc)).sum(-1, keepdim=True)
        ds = p * (dob @ vh.transpose(-1, -2) - delta)  # [H, nb, L]
        dq[lo:hi] = (ds @ kh * scale).transpose(0, 1).to(q.dtype)
        # Keys: only the kept columns, from the kept queries (rows of p, ds).
        p_kk, ds_kk = p[:, :, t], ds[:, :, t]  # [H, nb(q), nb(k)]
        dv_h = p_kk.transpose(-1, -2) @ dob  # [H, nb, D]
        dk_h = ds_kk.transpose(-1, -2) @ qk * scale
        dv[lo:hi] = dv_h.view(Hkv, groups, -1, D).sum(1).transpose(0, 1).to(v.dtype)
        dk[lo:hi] = dk_h.view(Hkv, groups, -1, D).sum(1).transpose(0, 1).to(k.dtype)
    return dq, dk, dv


# The dense backward (keep_idx None: exact mode, or nothing filtered that matters)
# on CUDA: "triton" runs the filtered kernels over every row, "flash" PyTorch's
# flash backward. The Triton pair measured faster on the H100 at every tested
# shape despite 1.4x the FLOPs (docs/kernels.md, Attention).
DENSE_BACKWARD = "triton"


def _gpu_kernels_available(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The forward on CUDA (fp16/bf16): "cudnn" takes cuDNN's fused attention where
# every batch row is one document (flash varlen for packed or padded batches),
# "flash" always PyTorch's varlen flash kernel. cuDNN measured 0.35 vs 0.63 ms a
# layer on the H100 at tinyllama 8x2048 (docs/kernels.md, "Whole step").
FORWARD_BACKEND = "cudnn"


def attention_forward(q, k, v, layout: Layout, scale: float | None = None):
    """Dispatch: on CUDA (fp16/bf16) cuDNN or PyTorch's varlen flash forward
    (``FORWARD_BACKEND``), the reference elsewhere. Returns (o [B, L, H, D],
    lse [B, H, L] float32); on CUDA lse may be a strided view."""
    if q.is_cuda:
        from centrifuge.ops import attention_triton as at

        if FORWARD_BACKEND == "cudnn" and at.cudnn_forward_possible(q, layout):
            try:
                return at.attention_forward_cudnn(q, k, v, layout, scale)
            except RuntimeError as err:  # e.g. a cuDNN without fused attention
                at.note_cudnn_failure(err)
        if at.flash_supported(q):
            return at.attention_forward_flash(q, k, v, layout, scale)
    return attention_forward_reference(q, k, v, layout, scale)


def own_key_grads(q, k, v, o, lse, do, rows: torch.Tensor, scale: float | None = None):
    """The K/V gradient that each of ``rows`` receives from its own query alone
    (the attention matrix's diagonal), row-wise.

    q, o: [B, L, H, D]; k, v: [B, L, Hkv, D]; lse: [B, H, L]; do: [m, H, D] the
    output gradient of ``rows`` ([m] flat indices into B*L).
    Returns dk, dv [m, Hkv, D] in the accumulation dtype (float32, or float64):
    p = exp(q.k * scale - lse), dv = p do, dk = scale * p (do.v - rowsum(do * o)) q,
    summed over the query heads of each KV head.
    """
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    groups = H // Hkv
    scale = D**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)

    def at_rows(t):
        return t.reshape(B * L, *t.shape[2:])[rows].to(acc)

    qr, orow, dor = at_rows(q), at_rows(o), do.to(acc)
    kr, vr = _repeat_kv(at_rows(k), groups, 1), _repeat_kv(at_rows(v), groups, 1)  # [m, H, D]
    lse_r = lse.transpose(1, 2).reshape(B * L, H)[rows].to(acc)
    p = torch.exp((qr * kr).sum(-1) * scale - lse_r)  # [m, H]
    ds = p * ((dor * vr).sum(-1) - (dor * orow).sum(-1))
    m = rows.numel()
    dv = (p[..., None] * dor).view(m, Hkv, groups, D).sum(2)
    dk = (ds[..., None] * qr).view(m, Hkv, groups, D).sum(2) * scale
    return dk, dv


def _reweight_extra_rows(q, k, v, o, lse, do, keep_idx, dk, dv, extra, scale):
    """dK_j = w dK_j + (1 - w) dK_j(own query), same for dV, on the sampled rows
    (``extra.pos`` in keep_idx): other rows' contributions scaled by w, the
    diagonal not (docs/design.md, "Modes")."""
    pos = extra.pos
    if pos.numel() == 0:
        return dk, dv
    dk_own, dv_own = own_key_grads(q, k, v, o, lse, do[pos], keep_idx[pos], scale)
    w = extra.weight
    dk = dk.index_copy(0, pos, (w * dk[pos].to(dk_own.dtype) + (1 - w) * dk_own).to(dk.dtype))
    dv = dv.index_copy(0, pos, (w * dv[pos].to(dv_own.dtype) + (1 - w) * dv_own).to(dv.dtype))
    return dk, dv


def attention_backward(
    q, k, v, o, lse, do, layout: Layout, keep_idx, scale: float | None = None, extra=None
):
    """Dispatch: on CUDA the Triton filtered backward (kept rows; every row when
    keep_idx is None, unless DENSE_BACKWARD selects flash's own dense backward);
    the reference on CPU. ``extra`` (a :class:`centrifuge.plan.ExtraRows`) marks
    sampled filtered rows among keep_idx whose K/V gradient from other rows'
    queries is reweighted, after the kernel, with a row-wise correction."""
    if _gpu_kernels_available(q):
        from centrifuge.ops import attention_triton as at

        use_flash = keep_idx is None and DENSE_BACKWARD == "flash" and at.flash_supported(q)
        if use_flash and at.flash_dense_backward_possible(lse, layout):
            return at.attention_backward_flash_dense(q, k, v, o, lse, do, layout, scale)
        dq, dk, dv = at.attention_backward_triton(q, k, v, o, lse, do, layout, keep_idx, scale)
    else:
        dq, dk, dv = attention_backward_reference(q, k, v, o, lse, do, layout, keep_idx, scale)
    if extra is not None:
        if keep_idx is None:
            raise ValueError("extra (sampled) rows need a compact backward (keep_idx)")
        dk, dv = _reweight_extra_rows(q, k, v, o, lse, do, keep_idx, dk, dv, extra, scale)
    return dq, dk, dv


def attention_backward_key_rows(
    q, k, v, o, lse, do, layout: Layout, keep_idx, key_rows, scale: float | None = None, extra=None
):
    """:func:`attention_backward` on the rows ``keep_idx``, plus the dK, dV that
    the filtered rows ``key_rows.idx`` (a :class:`centrifuge.plan.KeyRows`) receive
    from the queries of ``keep_idx`` (``BackwardOptions.kv_projections``).

    On CUDA the Triton kernels run the key rows as a second set of keys over the
    kept queries (no work for their queries). The reference runs the backward on
    the union of both with a zero output gradient on the key rows: a query with
    dO = 0 has Delta = 0, so it adds nothing to any dK or dV (their q, o, read
    there, are zeroed first). Returns dq, dk, dv [n, ., D] of keep_idx and dk,
    dv [m, Hkv, D] of the key rows."""
    if _gpu_kernels_available(q):  # the kernels take the key rows as a second key set
        from centrifuge.ops import attention_triton as at

        dq, dk, dv, dk_keys, dv_keys = at.attention_backward_triton(
            q, k, v, o, lse, do, layout, keep_idx, scale, key_idx=key_rows.idx)
        if extra is not None:
            dk, dv = _reweight_extra_rows(q, k, v, o, lse, do, keep_idx, dk, dv, extra, scale)
        return dq, dk, dv, dk_keys, dv_keys
    # The key rows' queries add nothing (dO = 0) but are read: make them finite
    # (a compact recompute leaves them unwritten).
    B, L = q.shape[:2]
    q, o = (t.reshape(B * L, *t.shape[2:]).index_fill(0, key_rows.idx, 0).view_as(t) for t in (q, o))
    n_union = key_rows.union.numel()
    do_union = do.new_zeros(n_union, *do.shape[1:]).index_copy_(0, key_rows.rows_pos, do)
    if extra is not None:  # sampled rows' positions, from keep_idx to the union
        extra = ExtraRows(key_rows.rows_pos[extra.pos], extra.weight)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do_union, layout, key_rows.union, scale, extra)
    rows, keys = key_rows.rows_pos, key_rows.pos
    return dq[rows], dk[rows], dv[rows], dk[keys], dv[keys]
