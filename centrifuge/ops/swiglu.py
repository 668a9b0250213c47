"""SwiGLU activation: ``a = silu(g) * u`` (Llama MLP).

forward:  g, u [n, F] -> a [n, F]
backward: da, g, u [n, F] (kept rows) -> dg, du [n, F]

:func:`swiglu_forward` and :func:`swiglu_backward_rows` dispatch: Triton
(``swiglu_triton.py``) on CUDA, the torch composition elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from centrifuge.ops.rowwise_dispatch import use_kernels


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: [N, F] -> [N, F]."""
    if use_kernels(g) and g.dim() == 2 and g.stride() == u.stride() and g.stride(-1) == 1:
        from centrifuge.ops.swiglu_triton import swiglu_forward_triton

        return swiglu_forward_triton(g, u)
    return F.silu(g) * u


def swiglu_backward_rows(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx=None):
    """Backward on kept rows, with the activation recomputed.

    da: [n, F] compact; g, u: [N, F] saved full size; idx: [n] kept rows (None:
    all). Returns (a [n, F], dgu [n, 2F]): the recomputed ``silu(g) * u`` and
    ``[dg, du]`` side by side (one GEMM gives both weight gradients)."""
    if use_kernels(g) and g.stride() == u.stride() and g.stride(-1) == 1:
        from centrifuge.ops.swiglu_triton import swiglu_backward_triton

        return swiglu_backward_triton(da, g, u, idx)
    g_r, u_r = (g, u) if idx is None else (g[idx], u[idx])
    dg, du = swiglu_backward(da, g_r, u_r)
    return F.silu(g_r) * u_r, torch.cat([dg, du], dim=1)


def swiglu_backward(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """Computed in float32, returned in g.dtype."""
    acc = torch.promote_types(g.dtype, torch.float32)
    gf, uf, daf = g.to(acc), u.to(acc), da.to(acc)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    du = daf * silu
    dg = daf * uf * sig * (1 + gf * (1 - sig))
    return dg.to(g.dtype), du.to(u.dtype)
