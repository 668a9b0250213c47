"""SwiGLU activation: ``a = silu(g) * u`` (Llama MLP).

forward:  g, u [n, F] -> a [n, F]
backward: da, g, u [n, F] (kept rows) -> dg, du [n, F]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_backward(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """Computed in float32, returned in g.dtype."""
    acc = torch.promote_types(g.dtype, torch.float32)
    gf, uf, daf = g.to(acc), u.to(acc), da.to(acc)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    du = daf * silu
    dg = daf * uf * sig * (1 + gf * (1 - sig))
    return dg.to(g.dtype), du.to(u.dtype)
