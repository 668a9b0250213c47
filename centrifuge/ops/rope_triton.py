"""Triton kernel for RoPE on rows (semantics: ``rope.py``, rotate-half).

One program per row rotates all heads of that row; cos/sin are read through
the keep index from the full-size [N, D] tables, and the result can land in a
column slice of a wider buffer (the layer's [n, (H + 2 Hkv) D] dQKV buffer), so
the backward writes dq and dk straight where the weight GEMM reads them.
The forward is the same rotation with the opposite sign of sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X, COS, SIN, IDX, OUT, n_heads, stride_xr, stride_xh, stride_or, stride_oh, stride_cs,
    SIGN: tl.constexpr, HAS_IDX: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """out1 = x1 cos1 - SIGN x2 sin1, out2 = x2 cos2 + SIGN x1 sin2
    (SIGN = 1: forward rotation; -1: its transpose, the backward)."""
    r = tl.program_id(0).to(tl.int64)
    if HAS_IDX:
        src = tl.load(IDX + r).to(tl.int64)
    else:
        src = r
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_HALF)[None, :]
    mc = c < HALF
    m = (h < n_heads) & mc
    cs = src * stride_cs + c
    cos1 = tl.load(COS + cs, mask=mc, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs + HALF, mask=mc, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs, mask=mc, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs + HALF, mask=mc, other=0.0).to(tl.float32)
    xo = X + r * stride_xr + h * stride_xh + c
    x1 = tl.load(xo, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos1 - SIGN * x2 * sin1
    o2 = x2 * cos2 + SIGN * x1 * sin2
    oo = OUT + r * stride_or + h * stride_oh + c
    tl.store(oo, o1.to(OUT.dtype.element_ty), mask=m)
    tl.store(oo + HALF, o2.to(OUT.dtype.element_ty), mask=m)


def rope_triton(x, cos, sin, idx=None, out=None, backward=False):
    """x: [n, H, D] (rows idx of the batch; all rows when idx is None);
    cos, sin: [N, D] full-size tables; out: optional [n, H, D] destination
    (any row/head strides, unit stride in D). Returns out."""
    n, H, D = x.shape
    if D % 2 or x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError(
            f"rope needs an even head dim with unit stride, got x {tuple(x.shape)} "
            f"stride {x.stride()}, cos stride {cos.stride()}, sin stride {sin.stride()}"
        )
    if out is None:
        out = torch.empty(n, H, D, device=x.device, dtype=x.dtype)
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"rope output must be {tuple(x.shape)} with unit stride in D")
    if n:
        half = D // 2
        _rope_kernel[(n,)](
            x, cos, sin, x if idx is None else idx, out, H,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            SIGN=-1.0 if backward else 1.0, HAS_IDX=idx is not None, HALF=half,
            BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4 if H * D <= 4096 else 8,
        )  # fmt: skip
    return out
