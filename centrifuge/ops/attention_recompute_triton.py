"""Triton kernel of the kept-query attention forward (activation recompute).

Semantics: :func:`centrifuge.ops.attention_recompute.attention_forward_rows_reference`.
The kernel is the dQ kernel of ``attention_triton`` with dO·Vᵀ and dS removed:
one program owns BLOCK_M consecutive kept queries x one query head, walks the
keys from the block's first document start to its last query in flat token
space (mask ``doc_start(i) <= key <= i``), and accumulates
``exp2(q.k * scale * log2e - lse * log2e) v`` in float32. Only the diagonal and
document-boundary tiles pay for the mask; blocks launch longest-first (the
order and the per-row document starts are the backward's, cached per keep_idx).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from centrifuge.ops.attention_triton import (
    _cached_bounds,
    _rows_view,
    block_order,
    default_config,
    probs_tile,
)
from centrifuge.plan import Layout

LOG2E = math.log2(math.e)


@triton.jit
def _o_tile(
    acc, q, lse2, qf, ds_, start, hi, K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok,
    qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    p, k, v = probs_tile(q, lse2, qf, ds_, start, hi, K, V, stride_kn, stride_vn, k_off, v_off,
                         offs_d, d_ok, qk_scale, BLOCK_N, MASK, PREC)  # fmt: skip
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)


@triton.jit
def _o_kernel(
    Q, K, V, LSE, KEEP, DOC_START, ORDER, O,
    n_keep, L, qk_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_lb, stride_lh, stride_lt, stride_on, stride_oh,
    GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.load(ORDER + tl.program_id(0))
    h = tl.program_id(1)
    first = pid_m * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < n_keep
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Padding rows of the last block: flat index -1 sees no key, lse = +inf gives p = 0.
    qf = tl.load(KEEP + rows, mask=row_ok, other=-1).to(tl.int64)
    ds_ = tl.load(DOC_START + rows, mask=row_ok, other=0).to(tl.int64)
    last = tl.minimum(first + BLOCK_M, n_keep) - 1
    lo = tl.load(DOC_START + first).to(tl.int64)
    hi = tl.load(KEEP + last).to(tl.int64) + 1
    max_ds = tl.load(DOC_START + last).to(tl.int64)
    min_q = tl.load(KEEP + first).to(tl.int64)

    r64 = rows.to(tl.int64)
    m2 = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + r64[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=m2, other=0.0)
    b = qf // L
    lse = tl.load(
        LSE + b * stride_lb + h * stride_lh + (qf - b * L) * stride_lt, mask=row_ok,
        other=float("inf"),
    )  # fmt: skip
    lse2 = lse * 1.4426950408889634
    k_off = (h // GROUPS).to(tl.int64) * stride_kh
    v_off = (h // GROUPS).to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    full_lo = tl.minimum(tl.cdiv(max_ds - lo, BLOCK_N), n_tiles)
    full_hi = tl.maximum(full_lo, tl.minimum((min_q + 1 - lo) // BLOCK_N, n_tiles))
    for t in range(0, full_lo):
        acc = _o_tile(acc, q, lse2, qf, ds_, lo + t * BLOCK_N, hi, K, V, stride_kn, stride_vn,
                      k_off, v_off, offs_d, d_ok, qk_scale, BLOCK_N, True, PREC)  # fmt: skip
    for t in range(full_lo, full_hi):
        acc = _o_tile(acc, q, lse2, qf, ds_, lo + t * BLOCK_N, hi, K, V, stride_kn, stride_vn,
                      k_off, v_off, offs_d, d_ok, qk_scale, BLOCK_N, False, PREC)  # fmt: skip
    for t in range(full_hi, n_tiles):
        acc = _o_tile(acc, q, lse2, qf, ds_, lo + t * BLOCK_N, hi, K, V, stride_kn, stride_vn,
                      k_off, v_off, offs_d, d_ok, qk_scale, BLOCK_N, True, PREC)  # fmt: skip
    tl.store(O + r64[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m2)  # fmt: skip


def attention_forward_rows_triton(
    q, k, v, lse, layout: Layout, idx: torch.Tensor, scale: float | None = None,
    block_m: int | None = None, block_n: int | None = None,
):  # fmt: skip
    """Same contract as ``attention_forward_rows_reference``: q [n, H, D] (rows idx),
    k, v [B, L, Hkv, D] (fp16, bf16 or fp32; unit stride in D or copied),
    lse [B, H, L] float32 -> o [n, H, D]. Tiles default to the dQ kernel's."""
    B, L, Hkv, D = k.shape
    n, H = q.shape[0], q.shape[1]
    o = torch.empty(n, H, D, device=q.device, dtype=q.dtype)
    if n == 0:
        return o
    cfg = default_config(D, q.dtype)
    bm, bn = block_m or cfg.dq_block_m, block_n or cfg.dq_block_n
    bounds = _cached_bounds(idx, layout.cu_seqlens)
    order = block_order(idx, bounds, "dq", bm)
    k3, v3 = _rows_view(k), _rows_view(v)
    q = q if q.stride(-1) == 1 else q.contiguous()
    lse = lse.float()
    _o_kernel[(order.numel(), H)](
        q, k3, v3, lse, idx, bounds.doc_start, order, o,
        n, L, (D**-0.5 if scale is None else scale) * LOG2E,
        q.stride(0), q.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        lse.stride(0), lse.stride(1), lse.stride(2), o.stride(0), o.stride(1),
        GROUPS=H // Hkv, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=bm, BLOCK_N=bn, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )  # fmt: skip
    return o
