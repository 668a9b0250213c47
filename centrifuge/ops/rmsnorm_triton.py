"""Triton kernels for RMSNorm on kept rows (semantics: ``rmsnorm.py``).

Every kernel reads the saved full-size activation *through* the keep index
(``x[idx[i]]`` is loaded inside the kernel, never gathered into a copy) and
writes compact ``[n_keep, D]`` outputs, or, at a layer's boundary, the
full-size gradient directly (kept rows computed, filtered rows zeroed) so the
scatter costs no extra pass. One program handles whole rows; ``D`` fits one
block (D <= 16384 in practice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from centrifuge.ops.rowwise_dispatch import num_programs, row_block, warps_for
from centrifuge.ops.step_cache import step_cached


@triton.jit
def _rms_forward_kernel(X, W, Y, RSTD, D, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + r * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    # Round the normalized value to the input dtype before scaling, as the reference does.
    xhat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + r * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + r, rstd)


@triton.jit
def _rms_apply_kernel(
    X, RSTD, W, IDX, OUT, D, stride_x, stride_o, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64)
    if HAS_IDX:
        src = tl.load(IDX + r).to(tl.int64)
    else:
        src = r
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + src * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + src).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    xhat = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + r * stride_o + cols, (w * xhat).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rms_backward_kernel(
    DY, X, RSTD, W, IDX, INV, RES, DX, DWP,
    n_out, rows_per_prog, D, stride_dy, stride_x, stride_res, stride_dx,
    HAS_IDX: tl.constexpr, SCATTER: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Output rows r of one program's range. Compact mode: row r is kept row r
    (x row idx[r]). Scatter mode: output row r is a full-size row; inv[r] is its
    compact index, or -1 for a filtered row, which gets zeros."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, n_out)
    for r in range(start, end):
        r64 = tl.cast(r, tl.int64)
        if SCATTER:
            c = tl.load(INV + r64).to(tl.int64)
            src = r64
        else:
            c = r64
            if HAS_IDX:
                src = tl.load(IDX + r64).to(tl.int64)
            else:
                src = r64
        if c >= 0:
            dy = tl.load(DY + c * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            x = tl.load(X + src * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + src).to(tl.float32)
            xhat = x * rstd
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
            if HAS_RES:
                dx += tl.load(RES + c * stride_res + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            # dweight sees the normalized value rounded to the activation dtype (the forward's).
            dw += dy * xhat.to(DX.dtype.element_ty).to(tl.float32)
        else:
            tl.store(DX + r64 * stride_dx + cols, tl.zeros([BLOCK], dtype=tl.float32).to(DX.dtype.element_ty), mask=m)
    tl.store(DWP + pid * D + cols, dw, mask=m)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _build_inverse(idx: torch.Tensor, N: int) -> torch.Tensor:
    inv = torch.full((N,), -1, device=idx.device, dtype=torch.int32)
    inv[idx] = torch.arange(idx.numel(), device=idx.device, dtype=torch.int32)
    return inv


def _inverse_index(idx: torch.Tensor, N: int) -> torch.Tensor:
    """[N] int32: the compact position of each kept row in ``idx``, -1 elsewhere.
    Every layer boundary of a step scatters through the same keep index: built
    once per index (three small launches per layer otherwise)."""
    return step_cached("inverse", _build_inverse, idx, args=(N,))


def rms_norm_forward_triton(x: torch.Tensor, w: torch.Tensor, eps: float):
    """x: [M, D] -> (y [M, D] x.dtype, rstd [M] float32)."""
    x = _rows2d(x)
    M, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M:
        block = row_block(D)
        _rms_forward_kernel[(M,)](
            x, w, y, rstd, D, x.stride(0), y.stride(0), eps, BLOCK=block, num_warps=warps_for(block)
        )
    return y, rstd


def rms_norm_apply_triton(x, rstd, w, idx=None):
    """Recompute ``w * norm(x)`` on rows ``idx`` of the saved x [N, D] with its
    saved rstd [N] -> [n, D] (n = len(idx), or N when idx is None)."""
    x = _rows2d(x)
    D = x.shape[1]
    n = x.shape[0] if idx is None else idx.numel()
    out = torch.empty(n, D, device=x.device, dtype=x.dtype)
    if n:
        block = row_block(D)
        _rms_apply_kernel[(n,)](
            x, rstd, w, x if idx is None else idx, out, D, x.stride(0), out.stride(0),
            HAS_IDX=idx is not None, BLOCK=block, num_warps=warps_for(block),
        )  # fmt: skip
    return out


def rms_norm_backward_triton(dy, x, rstd, w, idx=None, residual=None, scatter=False):
    """RMSNorm backward on kept rows, reading x and rstd through ``idx``.

    dy: [n, D] (compact), x: [N, D], rstd: [N] float32, w: [D], idx: [n] int64
    sorted (None: every row, n = N); residual: optional [n, D] added to dx (the
    residual branch's gradient, fused). Returns (dx, dw [D] float32): dx is
    [n, D], or with ``scatter`` the full-size [N, D] gradient, zero on rows
    outside idx.
    """
    x, dy = _rows2d(x), _rows2d(dy)
    N, D = x.shape
    n = dy.shape[0]
    if residual is not None:
        residual = _rows2d(residual)
    inv = None
    if scatter:
        if idx is None:
            raise ValueError("scatter=True needs the keep index idx")
        inv = _inverse_index(idx, N)
    n_out = N if scatter else n
    dx = torch.empty(n_out, D, device=x.device, dtype=x.dtype)
    progs = num_programs(max(n_out, 1), x.device)
    partial = torch.empty(progs, D, device=x.device, dtype=torch.float32)
    if n_out:
        block = row_block(D)
        _rms_backward_kernel[(progs,)](
            dy, x, rstd, w, x if idx is None else idx, x if inv is None else inv,
            dy if residual is None else residual, dx, partial,
            n_out, triton.cdiv(n_out, progs), D, dy.stride(0), x.stride(0),
            0 if residual is None else residual.stride(0), dx.stride(0),
            HAS_IDX=idx is not None, SCATTER=scatter, HAS_RES=residual is not None,
            BLOCK=block, num_warps=warps_for(block),
        )  # fmt: skip
    else:
        partial.zero_()
    return dx, partial.sum(0)
