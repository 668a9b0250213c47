"""RMSNorm, Llama style: normalize in float32, cast back, then scale.

``y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``

forward:  x [..., D], w [D] -> y [..., D] (x.dtype), rstd [...] float32 (float64 for float64 x)
backward: on the kept rows only; callers pass the rows they need.
"""

from __future__ import annotations

import torch


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
        if idx is None:
            dx, dw = rms_norm_backward(dy2, x2, r2, w)
            return dx.view_as(x), dw.to(w.dtype), None, None
        dxk, dw = rms_norm_backward(dy2[idx], x2[idx], r2[idx], w)
        dx = x2.new_zeros(x2.shape).index_copy_(0, idx, dxk)
        return dx.view_as(x), dw.to(w.dtype), None, None


def rms_norm(x, w, eps, plan):
    return RMSNormFunction.apply(x, w, eps, plan)
