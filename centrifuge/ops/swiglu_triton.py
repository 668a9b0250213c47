"""Triton kernels for SwiGLU (semantics: ``swiglu.py``).

Backward on kept rows: after ``da = dY[S] Wd^T`` one kernel reads g and u of
the kept rows through the index (the saved full-size forward activations), and
writes the recomputed activation ``a`` (for ``dWd = dY[S]^T a``) and ``dg, du``
side by side in one ``[n, 2F]`` buffer, so ``[dWg; dWu] = [dg du]^T h2`` is a
single GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_F = 1024


@triton.jit
def _swiglu_forward_kernel(G, U, A, F, stride, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(G + r * stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + r * stride + cols, mask=m, other=0.0).to(tl.float32)
    # silu rounds to the activation dtype before the product, as F.silu(g) * u does.
    silu = (g * tl.sigmoid(g)).to(A.dtype.element_ty).to(tl.float32)
    tl.store(A + r * F + cols, (silu * u).to(A.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_backward_kernel(
    DA, G, U, IDX, A, DGU, F, stride_da, stride_gu, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64)
    if HAS_IDX:
        src = tl.load(IDX + r).to(tl.int64)
    else:
        src = r
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(G + src * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + src * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    da = tl.load(DA + r * stride_da + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    a = silu.to(A.dtype.element_ty).to(tl.float32) * u
    tl.store(A + r * F + cols, a.to(A.dtype.element_ty), mask=m)
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGU + r * (2 * F) + cols, dg.to(DGU.dtype.element_ty), mask=m)
    tl.store(DGU + r * (2 * F) + F + cols, (da * silu).to(DGU.dtype.element_ty), mask=m)


def _check(g, u):
    if g.shape != u.shape or g.stride() != u.stride() or g.stride(-1) != 1:
        raise ValueError(
            f"g and u must be row-major [N, F] of one layout, got {tuple(g.shape)} "
            f"stride {g.stride()} and {tuple(u.shape)} stride {u.stride()}"
        )


def swiglu_forward_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: [N, F] -> a = silu(g) * u, [N, F] contiguous."""
    _check(g, u)
    N, F = g.shape
    a = torch.empty(N, F, device=g.device, dtype=g.dtype)
    if N:
        _swiglu_forward_kernel[(N, triton.cdiv(F, BLOCK_F))](g, u, a, F, g.stride(0), BLOCK=BLOCK_F)
    return a


def swiglu_backward_triton(da, g, u, idx=None):
    """da: [n, F] compact; g, u: [N, F] saved; idx: [n] rows (None: all).
    Returns (a [n, F], dgu [n, 2F]) with dgu[:, :F] = dg, dgu[:, F:] = du."""
    _check(g, u)
    if da.stride(-1) != 1:
        da = da.contiguous()
    n, F = da.shape
    a = torch.empty(n, F, device=g.device, dtype=g.dtype)
    dgu = torch.empty(n, 2 * F, device=g.device, dtype=g.dtype)
    if n:
        _swiglu_backward_kernel[(n, triton.cdiv(F, BLOCK_F))](
            da, g, u, g if idx is None else idx, a, dgu, F, da.stride(0), g.stride(0),
            HAS_IDX=idx is not None, BLOCK=BLOCK_F,
        )  # fmt: skip
    return a, dgu
