"""LM head + cross-entropy, fused and chunked.

The forward returns every row's loss (selection needs them all) without holding
[N, vocab] logits; the backward recomputes logits for kept rows only.

x: [N, d] hidden states, w: [V, d] LM head weight, targets: [N] int64
(``ignore_index`` rows get loss 0). Logits are taken in x.dtype and the
softmax in float32, as HF does (``logits.float()``).

:func:`linear_cross_entropy_forward` / ``_backward`` dispatch: Triton
(``linear_ce_triton.py``) on CUDA, the torch composition below elsewhere.
:class:`NormLinearCrossEntropyFunction` fuses the model's final RMSNorm in, so
the kept rows are read once and the normalized hidden states are not saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from centrifuge.ops.rmsnorm import rms_norm_apply_rows, rms_norm_backward_rows, rms_norm_forward
from centrifuge.ops.rowwise_dispatch import use_kernels

IGNORE_INDEX = -100


def _chunk_rows(n_rows: int, vocab: int, budget: int = 2**26) -> int:
    """Rows per chunk so one float32 logits chunk stays near ``budget`` bytes (64 MiB)."""
    return max(1, min(n_rows, budget // (4 * vocab)))


def linear_cross_entropy_reference(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Differentiable reference: [N] per-row losses (0 where ignored)."""
    logits = (x @ w.t()).to(torch.promote_types(x.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def linear_cross_entropy_forward(x, w, targets, ignore_index: int = IGNORE_INDEX):
    """x: [N, d], w: [V, d], targets: [N] -> (loss [N] float32, lse [N] float32)."""
    if use_kernels(x):
        from centrifuge.ops.linear_ce_triton import linear_ce_forward_triton

        return linear_ce_forward_triton(x, w, targets, ignore_index)
    n = x.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    loss = torch.empty(n, device=x.device, dtype=acc)
    lse = torch.empty(n, device=x.device, dtype=acc)
    step = _chunk_rows(n, w.shape[0])
    for s in range(0, n, step):
        logits = (x[s : s + step] @ w.t()).to(acc)
        t = targets[s : s + step]
        m = torch.logsumexp(logits, dim=-1)
        ok = t != ignore_index
        picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        loss[s : s + step] = torch.where(ok, m - picked, 0.0)
        lse[s : s + step] = m
    return loss, lse


def linear_cross_entropy_backward(
    dloss, x, w, targets, lse, ignore_index: int = IGNORE_INDEX, need_dw: bool = True
):  # fmt: skip
    """Backward on the given rows.

    dloss: [n] (the upstream gradient of those rows' losses), x: [n, d],
    targets: [n], lse: [n]. Returns (dx [n, d] in x.dtype, dw [V, d] float32;
    x.dtype on the kernel path, whose GEMM accumulates in float32 internally).
    dw is None without ``need_dw`` (a frozen LM head: no weight-gradient GEMM).
    """
    if use_kernels(x):
        from centrifuge.ops.linear_ce_triton import linear_ce_backward_triton

        return linear_ce_backward_triton(dloss, x, w, targets, lse, ignore_index, need_dw=need_dw)
    n = x.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    dx = torch.empty_like(x)
    dw = torch.zeros(w.shape, device=w.device, dtype=acc) if need_dw else None
    scale = torch.where(targets != ignore_index, dloss.to(acc), 0.0)
    step = _chunk_rows(n, w.shape[0])
    for s in range(0, n, step):
        xs, t = x[s : s + step], targets[s : s + step]
        logits = (xs @ w.t()).to(acc)
        g = torch.exp(logits - lse[s : s + step, None])
        g.scatter_add_(1, t.clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
        g = (g * scale[s : s + step, None]).to(x.dtype)
        dx[s : s + step] = g @ w
        if need_dw:
            dw += (g.t() @ xs).to(acc)
    return dx, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row losses from hidden states; backward on the plan's kept rows only.

    x: [B, L, d], w: [V, d], targets: [B, L] -> loss [B, L] float32.
    """

    @staticmethod
    def forward(ctx, x, w, targets, plan, ignore_index):
        d = x.shape[-1]
        loss, lse = linear_cross_entropy_forward(x.reshape(-1, d), w, targets.reshape(-1), ignore_index)
        ctx.save_for_backward(x, w, targets, lse)
        ctx.plan, ctx.ignore_index = plan, ignore_index
        return loss.view(targets.shape)

    @staticmethod
    def backward(ctx, dloss):
        x, w, targets, lse = ctx.saved_tensors
        d = x.shape[-1]
        x2, t2, dl = x.reshape(-1, d), targets.reshape(-1), dloss.reshape(-1)
        idx = ctx.plan.keep_idx
        need_dw = ctx.needs_input_grad[1]
        if idx is None:
            dx, dw = linear_cross_entropy_backward(dl, x2, w, t2, lse, ctx.ignore_index, need_dw)
        else:
            dxk, dw = linear_cross_entropy_backward(
                dl[idx], x2[idx], w, t2[idx], lse[idx], ctx.ignore_index, need_dw
            )
            dx = x2.new_zeros(x2.shape).index_copy_(0, idx, dxk)
        return dx.view_as(x), None if dw is None else dw.to(w.dtype), None, None, None


# Not traced by torch.compile: a traced backward would read the plan as it was at
# the forward, before the loss filled it (docs/design.md, "torch.compile").
@torch.compiler.disable
def linear_cross_entropy(x, w, targets, plan, ignore_index: int = IGNORE_INDEX):
    return LinearCrossEntropyFunction.apply(x, w, targets, plan, ignore_index)


class NormLinearCrossEntropyFunction(torch.autograd.Function):
    """Final RMSNorm + LM head + cross-entropy in one Function.

    x: [B, L, d] (the last layer's output, before the norm), norm_w: [d],
    w: [V, d], targets: [B, L] -> (loss [B, L] float32, h [B, L, d]).
    ``h`` (the normalized hidden states) is returned for inspection only: it
    carries no gradient. Saves x and rstd (not h); the backward recomputes h on
    the kept rows, reads them once, and scatters one full-size dx.
    """

    @staticmethod
    def forward(ctx, x, norm_w, w, targets, plan, eps, ignore_index):
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        h, rstd = rms_norm_forward(x2, norm_w, eps)
        loss, lse = linear_cross_entropy_forward(h, w, targets.reshape(-1), ignore_index)
        ctx.save_for_backward(x2, norm_w, w, targets, rstd, lse)
        ctx.plan, ctx.ignore_index, ctx.x_shape = plan, ignore_index, x.shape
        ctx.mark_non_differentiable(h)
        return loss.view(targets.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dloss, _dh):
        x2, norm_w, w, targets, rstd, lse = ctx.saved_tensors
        idx = ctx.plan.keep_idx

        def rows(t):
            return t if idx is None else t[idx]

        hk = rms_norm_apply_rows(x2, rstd, norm_w, idx)
        dhk, dw = linear_cross_entropy_backward(
            rows(dloss.reshape(-1)), hk, w, rows(targets.reshape(-1)), rows(lse), ctx.ignore_index,
            need_dw=ctx.needs_input_grad[2],
        )  # fmt: skip
        dx, dnw = rms_norm_backward_rows(dhk, x2, rstd, norm_w, idx, scatter=True)
        dw = None if dw is None else dw.to(w.dtype)
        return dx.view(ctx.x_shape), dnw.to(norm_w.dtype), dw, None, None, None, None


@torch.compiler.disable  # as linear_cross_entropy
def norm_linear_cross_entropy(x, norm_w, w, targets, plan, eps, ignore_index: int = IGNORE_INDEX):
    """(loss [B, L] float32, h [B, L, d] without gradient); see the Function."""
    return NormLinearCrossEntropyFunction.apply(x, norm_w, w, targets, plan, eps, ignore_index)
