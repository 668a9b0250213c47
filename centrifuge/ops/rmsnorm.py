"""RMSNorm, Llama style: normalize in float32, cast back, then scale.

``y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``

forward:  x [..., D], w [D] -> y [..., D] (x.dtype), rstd [...] float32 (float64 for float64 x)
backward: on the kept rows only; callers pass the rows they need.

The ``*_rows`` functions and :func:`rms_norm_forward` dispatch: Triton kernels
(``rmsnorm_triton.py``) on CUDA, the plain PyTorch reference elsewhere.
"""

from __future__ import annotations

import torch

from centrifuge.ops.rowwise_dispatch import use_kernels
from centrifuge.plan import select_rows


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32 for half inputs; float64 stays float64 (the tests' precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Differentiable plain-PyTorch RMSNorm (the semantics every path matches)."""
    xf = _acc(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float):
    """x: [..., D], w: [D] -> (y [..., D] in x.dtype, rstd [...] float32 (float64 for float64 x))."""
    if use_kernels(x):
        from centrifuge.ops.rmsnorm_triton import rms_norm_forward_triton

        y, rstd = rms_norm_forward_triton(x.reshape(-1, x.shape[-1]), w, eps)
        return y.view(x.shape), rstd.view(x.shape[:-1])
    return rms_norm_forward_reference(x, w, eps)


def rms_norm_forward_reference(x: torch.Tensor, w: torch.Tensor, eps: float):
    """The torch composition of :func:`rms_norm_forward`."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return w * (xf * rstd[..., None]).to(x.dtype), rstd


def rms_norm_apply(x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Recompute the forward output from saved ``rstd`` (cheaper than storing y)."""
    return w * (_acc(x) * rstd[..., None]).to(x.dtype)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor):
    """dy, x: [n, D], rstd: [n] float32, w: [D] -> (dx [n, D] in x.dtype, dw [D] float32)."""
    xhat = _acc(x) * rstd[..., None]
    dyf = _acc(dy)
    dw = (dyf * _acc(xhat.to(x.dtype))).reshape(-1, x.shape[-1]).sum(0)
    g = dyf * _acc(w)
    dx = rstd[..., None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


def _flat_rows(x, rstd, idx):
    """View x [N, ..., D] as rows [N * k, D] (k heads for the q/k norms) and
    widen the kept-row index to the rows of every head."""
    D = x.shape[-1]
    k = x[0].numel() // D if x.shape[0] else 1
    if idx is not None and k > 1:
        idx = (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)
    return x.reshape(-1, D), rstd.reshape(-1), idx


def rms_norm_apply_rows(x, rstd, w, idx=None):
    """Normalized rows ``idx`` of the saved x [N, D] (rstd [N]) -> [n, D].
    On CUDA one kernel reads x through idx (no gathered copy)."""
    if use_kernels(x):
        from centrifuge.ops.rmsnorm_triton import rms_norm_apply_triton

        x2, r2, i2 = _flat_rows(x, rstd, idx)
        out = rms_norm_apply_triton(x2, r2, w, i2)
        return out.view(-1, *x.shape[1:])
    return rms_norm_apply(select_rows(x, idx), select_rows(rstd, idx), w)


def rms_norm_backward_rows(dy, x, rstd, w, idx=None, residual=None, scatter=False):
    """Backward on kept rows: dy [n, D] compact, x [N, D] and rstd [N] saved full
    size, idx [n] sorted kept rows (None = all). ``residual`` [n, D] is added to
    dx (the skip connection's gradient). Returns (dx, dw [D] float32 (float64
    for float64 x)); dx is [n, D], or with ``scatter`` the full [N, D] gradient
    with zeros outside idx (the layer boundary, where autograd needs full size)."""
    if use_kernels(x):
        from centrifuge.ops.rmsnorm_triton import rms_norm_backward_triton

        x2, r2, i2 = _flat_rows(x, rstd, idx)
        D = x.shape[-1]
        res2 = None if residual is None else residual.reshape(-1, D)
        scatter = scatter and idx is not None
        dx, dw = rms_norm_backward_triton(dy.reshape(-1, D), x2, r2, w, i2, res2, scatter)
        return dx.view(-1, *x.shape[1:]), dw
    dx, dw = rms_norm_backward(dy, select_rows(x, idx), select_rows(rstd, idx), w)
    if residual is not None:
        dx = dx + residual
    if scatter and idx is not None:
        dx = x.new_zeros(x.shape).index_copy_(0, idx, dx)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward runs on the plan's kept rows only.

    x: [B, L, D], w: [D]; the gradient reaching x is zero outside kept rows.
    """

    @staticmethod
    def forward(ctx, x, w, eps, plan):
        y, rstd = rms_norm_forward(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        idx = ctx.plan.keep_idx
        d = x.shape[-1]
        x2, r2, dy2 = x.reshape(-1, d), rstd.reshape(-1), dy.reshape(-1, d)
        dx, dw = rms_norm_backward_rows(select_rows(dy2, idx), x2, r2, w, idx, scatter=True)
        return dx.view_as(x), dw.to(w.dtype), None, None


# Not traced by torch.compile: a traced backward would read the plan as it was at
# the forward, before the loss filled it (docs/design.md, "torch.compile").
@torch.compiler.disable
def rms_norm(x, w, eps, plan):
    return RMSNormFunction.apply(x, w, eps, plan)
