"""Triton kernels for the LM head + cross-entropy (semantics: ``linear_ce.py``).

Forward: row chunks of logits from cuBLAS in the activation dtype (never the
[N, vocab] float32 logits), then one kernel per chunk reads each row once and
writes its log-sum-exp and loss (online max/sum in float32).
Backward on kept rows: the vocabulary is cut in column chunks; per chunk cuBLAS
recomputes the logits, one kernel turns them *in place* into the softmax
gradient ``(softmax - onehot) * dloss``, and two GEMMs give that chunk's slice
of dW (written once, no accumulation) and its share of dx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes of one logits chunk (activation dtype), forward and backward. The dense
# stack uses the same chunks, so the LM head's transient memory never exceeds
# dense training's. Values from the device probes (docs/kernels.md).
FORWARD_BUDGET = 2**29
BACKWARD_BUDGET = 2**28
BLOCK_V = 1024  # the backward's column block
FORWARD_BLOCK_V, FORWARD_WARPS = 1024, 4  # the forward's row scan


@triton.jit
def _ce_forward_kernel(LOGITS, T, LOSS, LSE, V, stride_l, ignore_index, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    base = LOGITS + r * stride_l
    # Per-lane running max and scaled sum; lanes past V hold a finite -1e30 so
    # no inf - inf appears, and their weight exp(-1e30 - m) is 0 in the end.
    m_vec = tl.full([BLOCK], -1e30, dtype=tl.float32)
    s_vec = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-1e30).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
    t = tl.load(T + r)
    ok = t != ignore_index
    picked = tl.load(base + tl.where(ok, t, 0)).to(tl.float32)
    tl.store(LSE + r, lse)
    tl.store(LOSS + r, tl.where(ok, lse - picked, 0.0))


@triton.jit
def _ce_grad_kernel(LOGITS, T, LSE, SCALE, n_cols, v0, stride_l, BLOCK: tl.constexpr):
    """In place: logits[r, j] <- (exp(logits - lse[r]) - [v0 + j == t[r]]) * scale[r]."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    ptr = LOGITS + r * stride_l + cols
    x = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    lse = tl.load(LSE + r)
    t = tl.load(T + r)
    scale = tl.load(SCALE + r)
    p = tl.exp(x - lse)
    p = tl.where(cols + v0 == t, p - 1.0, p)
    tl.store(ptr, (p * scale).to(LOGITS.dtype.element_ty), mask=m)


def _check(x, w, targets):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(
            f"expected x [N, d], w [V, d], targets [N]; got {tuple(x.shape)}, "
            f"{tuple(w.shape)}, {tuple(targets.shape)}"
        )


def linear_ce_forward_triton(x, w, targets, ignore_index: int, budget: int | None = None):
    """x: [N, d], w: [V, d], targets: [N] -> (loss [N] float32, lse [N] float32)."""
    _check(x, w, targets)
    budget = FORWARD_BUDGET if budget is None else budget
    N, V = x.shape[0], w.shape[0]
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty(N, device=x.device, dtype=torch.float32)
    rows = max(1, min(N, budget // (x.element_size() * V)))
    buf = torch.empty(rows, V, device=x.device, dtype=x.dtype) if N else None
    targets = targets.contiguous()
    for s in range(0, N, rows):
        c = min(rows, N - s)
        logits = torch.mm(x[s : s + c], w.t(), out=buf[:c])
        _ce_forward_kernel[(c,)](
            logits, targets[s:], loss[s:], lse[s:], V, logits.stride(0), ignore_index,
            BLOCK=FORWARD_BLOCK_V, num_warps=FORWARD_WARPS,
        )  # fmt: skip
    return loss, lse


def linear_ce_backward_triton(
    dloss, x, w, targets, lse, ignore_index: int, budget: int | None = None, need_dw: bool = True
):  # fmt: skip
    """Backward on the given rows: dloss, targets, lse: [n]; x: [n, d] (compact).
    Returns (dx [n, d], dw [V, d]), both in x.dtype; dw is None without need_dw
    (a frozen LM head: no weight-gradient GEMM)."""
    _check(x, w, targets)
    budget = BACKWARD_BUDGET if budget is None else budget
    n, d = x.shape
    V = w.shape[0]
    dw = torch.empty(V, d, device=x.device, dtype=x.dtype) if need_dw else None
    if n == 0:
        return torch.empty_like(x), dw if dw is None else dw.zero_()
    scale = torch.where(targets != ignore_index, dloss.float(), 0.0).contiguous()
    targets, lse = targets.contiguous(), lse.float().contiguous()
    # Column chunks: a multiple of 128 (GEMM-friendly), the whole vocabulary if it fits.
    cols = min(V, max(128, budget // (x.element_size() * n) // 128 * 128))
    buf = torch.empty(n * cols, device=x.device, dtype=x.dtype)
    dx = dx32 = None
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        wc = w[v0 : v0 + c]
        g = torch.mm(x, wc.t(), out=buf[: n * c].view(n, c))
        _ce_grad_kernel[(n, triton.cdiv(c, BLOCK_V))](
            g, targets, lse, scale, c, v0, g.stride(0), BLOCK=BLOCK_V
        )
        if need_dw:
            torch.mm(g.t(), x, out=dw[v0 : v0 + c])
        part = g @ wc
        if c == V:
            dx = part
        elif dx32 is None:
            dx32 = part.float()
        else:
            dx32 += part
    return (dx if dx is not None else dx32.to(x.dtype)), dw
