"""Rotary position embedding (rotate-half convention, as in HF Llama), with the
Llama-3 frequency scaling.

cos, sin: [..., D] (the D/2 frequencies repeated twice), x: [n, H, D].
:func:`rope_forward` and :func:`rope_backward_rows` dispatch: Triton
(``rope_triton.py``) on CUDA, the torch composition elsewhere.
"""

from __future__ import annotations

import math

import torch

from centrifuge.ops.rowwise_dispatch import use_kernels


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies; ``scaling`` follows the HF
    ``rope_scaling`` dict (``rope_type`` ``llama3`` or ``default``/None)."""
    # float32 throughout, as HF computes it, so checkpoints behave identically.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise NotImplementedError(f"rope scaling {kind!r} is not supported (default, llama3 are)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """position_ids: [...] int -> cos, sin: [..., D] in ``dtype`` (angles in float32)."""
    angles = position_ids.float()[..., None] * inv_freq.to(position_ids.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [n, H, D], cos/sin: [n, D]. Differentiable."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out=None) -> torch.Tensor:
    """x: [N, H, D], cos/sin: [N, D] -> [N, H, D]. ``out``: optional destination
    with unit stride in D; ``out=x`` rotates in place (each row is read whole
    before it is written)."""
    if use_kernels(x) and x.stride(-1) == 1 and cos.stride() == sin.stride():
        from centrifuge.ops.rope_triton import rope_triton

        return rope_triton(x, cos, sin, out=out)
    y = rope_reference(x, cos, sin)
    return y if out is None else out.copy_(y)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation's transpose is the rotation by -angle."""
    return dy * cos[:, None, :] - _rotate_half(dy) * sin[:, None, :]


def rope_backward_rows(dy, cos, sin, idx=None, out=None):
    """Backward on kept rows: dy [n, H, D] compact, cos/sin [N, D] full-size
    tables read at rows idx (None: all). ``out``: optional [n, H, D] destination
    (e.g. a column slice of the layer's dQKV buffer). Returns the result."""
    if use_kernels(dy) and dy.stride(-1) == 1 and cos.stride() == sin.stride():
        from centrifuge.ops.rope_triton import rope_triton

        return rope_triton(dy, cos, sin, idx, out, backward=True)
    cos_r, sin_r = (cos, sin) if idx is None else (cos[idx], sin[idx])
    dx = rope_backward(dy, cos_r, sin_r)
    return dx if out is None else out.copy_(dx)
