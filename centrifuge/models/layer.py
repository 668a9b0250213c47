"""One Llama-family decoder layer as a single autograd Function.

Why one Function per layer (docs/design.md has the long form): autograd insists
that a gradient has its tensor's full shape, so every Function boundary costs a
gather of kept rows on the way in and a zero-filled scatter on the way out.
Inside the layer the gradient stays compact, [n_keep, ...], from the MLP down to
the input norm; only the residual stream between layers is full size. A layer
is also the unit that FSDP2 shards, activation checkpointing wraps and the
Hugging Face patch replaces, so this boundary costs nothing elsewhere.

Forward (dense, every row; the selection needs every row's loss):
    h1 = rmsnorm(x);  q, k, v = h1 Wq, h1 Wk, h1 Wv (+ bias) (+ q/k norm);  rope
    o = attention(q, k, v);  x2 = x + o Wo
    h2 = rmsnorm(x2); a = silu(h2 Wg) * (h2 Wu);  y = x2 + a Wd
Backward (kept rows S only): dimension-reduced GEMMs, e.g. dWd = dY[S]^T a[S],
row-wise ops on S, and the filtered attention backward.
Activation checkpointing (``recompute``) saves x and the attention lse only; the
backward recomputes K, V for every row and the rest of the layer for S only
(docs/kernels.md, "Activation checkpointing", has the cost model).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from centrifuge.models.tensor_parallel import RowSplit, TPGroup
from centrifuge.ops.attention import attention_backward, attention_backward_key_rows, attention_forward
from centrifuge.ops.attention_recompute import attention_forward_rows
from centrifuge.ops.rmsnorm import rms_norm_apply_rows, rms_norm_backward_rows, rms_norm_forward
from centrifuge.ops.rope import rope_backward_rows, rope_forward
from centrifuge.ops.swiglu import swiglu_backward_rows, swiglu_forward
from centrifuge.plan import Plan, select_rows

# The projections: weight name -> (submodule, attribute) in a decoder layer.
PROJECTIONS = {
    "wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
    "wo": ("self_attn", "o_proj"), "wg": ("mlp", "gate_proj"), "wu": ("mlp", "up_proj"),
    "wd": ("mlp", "down_proj"),
}  # fmt: skip
# LoRA adapters of a projection p: p_lora_A [r, in] and p_lora_B [out, r], the
# latter already multiplied by the adapter's scaling (outside the Function, so
# autograd applies the scale to B's gradient): y = x Wᵀ + (dropout(x) Aᵀ) Bᵀ
# (dropout: peft's lora_dropout, in training only; AdapterDropout).
LORA_NAMES = tuple(f"{p}_lora_{ab}" for p in PROJECTIONS for ab in "AB")
# The order in which a layer's weights enter the Function (None where absent).
WEIGHT_NAMES = (
    "input_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm",
    "wo", "post_norm", "wg", "wu", "wd", *LORA_NAMES,
)  # fmt: skip


@dataclass(frozen=True)
class LayerShape:
    """num_heads, num_kv_heads: this rank's heads (all of them without tensor
    parallelism); tp: the tensor-parallel group (None: one rank, no collective)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    layer_index: int = 0  # position in the stack: Plan.rows_for(layer_index) picks the rows
    tp: TPGroup | None = None


def _linear(x, w, b=None):
    # addmm folds the bias (or a residual) into the GEMM's epilogue: no extra pass.
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


# Structure switches of the layer's GEMMs (docs/kernels.md, "Whole step", has the
# measurements behind the defaults). fused_qkv: one GEMM against [Wq; Wk; Wv] in
# the forward and one for dX in the backward, at the cost of concatenating the
# weights (a copy per call; models with q/k norms keep separate projections).
# fused_gate_up: the same for [Wg; Wu].
PERF = {"fused_qkv": True, "fused_gate_up": False}


def _fuse_qkv(W: dict) -> bool:
    return PERF["fused_qkv"] and W["q_norm"] is None


def _cat(*ts):
    """Row-wise concatenation of weights (or biases); None when they are absent."""
    return None if ts[0] is None else torch.cat(ts)


class AdapterDropout:
    """peft's ``lora_dropout`` on the adapters' inputs, for one call of a layer.

    peft computes y = x Wᵀ + (dropout(x) Aᵀ) Bᵀ·scaling with dropout(x) = x ∘ M/(1-p),
    M ~ Bernoulli(1-p) per element, drawn for every projection separately. The
    backward needs M on its rows (dA = (dY B)ᵀ dropout(X); dX gets ((dY B) A) ∘ M/(1-p)),
    and so does the recompute. Saving the masks would cost N x in bytes per
    projection and layer, about 17 KB a token and layer for TinyLlama, where a
    checkpointed layer keeps 4.2 KB; instead the generator's state before each
    draw is saved (CUDA: its seed and offset; CPU: 5 KB per projection and
    layer, whatever N) and the draw is repeated from it: the same mask, at the
    cost of drawing every row again. The forward draws from the device's default
    generator with nn.Dropout's CPU op (``bernoulli_(1 - p)``, then ``/ (1 - p)``), in
    peft's order (q, k, v, o, gate, up, down): a patched model consumes the random
    stream as the unpatched peft model does, and on the CPU applies the same masks.

    p: projection name (PROJECTIONS) -> dropout probability, for the adapters
    that drop their input in this call (training mode, p > 0).
    """

    def __init__(self, p: dict[str, float]):
        self.p = p
        self.states: dict[str, tuple[torch.Tensor, torch.Size, torch.Tensor]] = {}

    def noise(self, name: str, like: torch.Tensor, rows=None) -> torch.Tensor | None:
        """M/(1-p) for projection ``name``'s adapter input, at ``rows`` of the
        forward's N (None: every row), in ``like``'s dtype and device; None when
        the adapter does not drop. The first call (the forward: ``like`` is the
        input, [N, in]) draws from the default generator; later calls (backward,
        recompute) repeat that draw."""
        p = self.p.get(name)
        if p is None:
            return None
        saved = self.states.get(name)
        if saved is None:
            state = _rng_state(like.device)
            m = like.new_empty(like.shape).bernoulli_(1 - p).div_(1 - p)
            # The number of kept entries: a repeated draw that disagrees (a
            # generator that did not restore) fails a device assert, never a
            # silently wrong gradient.
            self.states[name] = (state, like.shape, (m != 0).sum())
        else:
            state, shape, kept = saved
            generator = torch.Generator(like.device)
            generator.set_state(state)
            m = like.new_empty(shape).bernoulli_(1 - p, generator=generator).div_(1 - p)
            torch._assert_async((m != 0).sum() == kept, "lora_dropout: the repeated mask differs")
        return select_rows(m, rows)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default generator."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _lora(y, x, W: dict, p: str, drop: AdapterDropout, rows=None):
    """Adds projection p's adapter, (dropout(x) Aᵀ) Bᵀ, to its output y in place (y
    may be a column view of a fused output); returns y. x: the projection's input
    at ``rows`` of the forward (None: every row)."""
    A = W[p + "_lora_A"]
    if A is not None:
        m = drop.noise(p, x, rows)
        y.addmm_((x if m is None else x * m) @ A.t(), W[p + "_lora_B"].t())
    return y


def _lora_backward(dW: dict, dy, x, W: dict, p: str, dx=None, m=None):
    """Rank-r gradients of projection p's adapter from the compact rows: dy [n, out],
    the projection's input x [n, in] and its dropout factor m [n, in] (None: no
    dropout; X' = X ∘ m): dA = (dY B)ᵀ X', dB = dYᵀ (X' Aᵀ); adds ((dY B) A) ∘ m to
    dx [n, in] in place when given. Returns dx."""
    A = W[p + "_lora_A"]
    if A is None:
        return dx
    dyb = dy @ W[p + "_lora_B"]
    if m is not None:
        x = x * m
    dW[p + "_lora_A"] = dyb.t() @ x
    dW[p + "_lora_B"] = dy.t() @ (x @ A.t())
    return dx if dx is None else _lora_dx(dx, dyb, A, m)


def _lora_dx(dx, dyb, A, m):
    """dx += ((dY B) A) ∘ m in place (m None: no dropout); returns dx."""
    return dx.addmm_(dyb, A) if m is None else dx.addcmul_(dyb @ A, m)


def _split_heads(qkv: torch.Tensor, N: int, H: int, Hkv: int, D: int):
    """[N, (H + 2 Hkv) D] -> views q [N, H, D], k, v [N, Hkv, D] (row stride kept)."""
    q = qkv[:, : H * D].view(N, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (H + Hkv) * D :].view(N, Hkv, D)
    return q, k, v


@dataclass
class Activations:
    """What the backward reads of a layer's forward. rstd1, k, v, lse, k_lin and
    rstd_k always cover every row (N = B*L); q, o, x2, rstd2, g, u, q_lin and
    rstd_q cover the rows the forward computed them for: every row, or only the
    kept rows when the backward recomputed them (see :func:`_forward`).
    q: [n, H, D], k, v: [N, Hkv, D] (after RoPE), o: [n, H*D], lse: [B, H, L],
    x2: [n, d], g, u: [n, F]; q_lin, k_lin: projections before the q/k norms.
    h1, h2: the recompute under tensor parallelism only, the normalized rows it
    gathered from the ranks (h1: every row, [N, d]; h2: the rows it computed,
    [n, d]), which the backward then reads instead of gathering them again."""

    rstd1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    x2: torch.Tensor
    rstd2: torch.Tensor
    g: torch.Tensor
    u: torch.Tensor
    q_lin: torch.Tensor | None = None
    k_lin: torch.Tensor | None = None
    rstd_q: torch.Tensor | None = None
    rstd_k: torch.Tensor | None = None
    h1: torch.Tensor | None = None
    h2: torch.Tensor | None = None


def _residual_out(y, x, W: dict, w: str, split: RowSplit | None):
    """x + y Wᵀ for the weight named w: in the GEMM's epilogue on one rank; under
    tensor parallelism y Wᵀ is a partial sum over the ranks' shards of W,
    reduce-scattered onto the rows' owners before the residual joins."""
    if split is None:
        return _linear(y, W[w], x)
    return split.reduce(y @ W[w].t()).add_(x)


def _gathered(t, split: RowSplit | None):
    """Every rank's rows of a sequence-parallel tensor (t itself on one rank)."""
    return t if split is None else split.gather(t)


def _forward(xf, cos, sin, W: dict, drop: AdapterDropout, shape: LayerShape, layout, rows=None,
             lse=None, splits=None) -> Activations:  # fmt: skip
    """The layer up to the MLP's gate/up projections (the caller adds ``a Wd``).

    xf: [N, d]; cos, sin: [N, head_dim]. rows=None: every row (the forward, and
    the dense recompute). rows = kept rows [n] (the compact recompute): the input
    norm and K/V for every row (the attention backward reads every key), the
    rest for the kept rows only, the attention output from the forward's saved
    ``lse`` ([B, H, L]) in one pass over the keys.
    splits: tensor parallelism, (every row, ``rows``) as RowSplits; xf is then
    this rank's [N/tp, d] rows and x2, rstd2 come back for its rows of ``rows``.
    """
    B, L = layout.shape
    N, H, Hkv, D = B * L, shape.num_heads, shape.num_kv_heads, shape.head_dim
    every, kept = splits or (None, None)
    recomputing = lse is not None  # the backward's recompute (the forward computes lse)
    h1, rstd1 = rms_norm_forward(xf, W["input_norm"], shape.eps)
    h1 = _gathered(h1, every)
    q_lin = k_lin = rstd_q = rstd_k = None
    if _fuse_qkv(W) and rows is None:
        # One GEMM against [Wq; Wk; Wv] (the K/V projections alone are skinny,
        # N = Hkv*D); q, k, v stay column views of its output and RoPE rotates
        # q and k in place, so the saved bytes are those of q, k, v.
        qkv = _linear(h1, _cat(W["wq"], W["wk"], W["wv"]), _cat(W["bq"], W["bk"], W["bv"]))
        for p, cols in zip(("wq", "wk", "wv"), qkv.split([H * D, Hkv * D, Hkv * D], dim=1)):
            _lora(cols, h1, W, p, drop)
        q, k, v = _split_heads(qkv, N, H, Hkv, D)
        rope_forward(q, cos, sin, out=q)
        rope_forward(k, cos, sin, out=k)
    else:
        hq = select_rows(h1, rows)
        q = _lora(_linear(hq, W["wq"], W["bq"]), hq, W, "wq", drop, rows).view(hq.shape[0], H, D)
        if _fuse_qkv(W):  # the compact recompute: K and V of every row in one GEMM
            kv = _linear(h1, _cat(W["wk"], W["wv"]), _cat(W["bk"], W["bv"]))
            k = _lora(kv[:, : Hkv * D], h1, W, "wk", drop).view(N, Hkv, D)
            v = _lora(kv[:, Hkv * D :], h1, W, "wv", drop).view(N, Hkv, D)
        else:
            k = _lora(_linear(h1, W["wk"], W["bk"]), h1, W, "wk", drop).view(N, Hkv, D)
            v = _lora(_linear(h1, W["wv"], W["bv"]), h1, W, "wv", drop).view(N, Hkv, D)
        if W["q_norm"] is not None:
            q_lin, k_lin = q, k
            q, rstd_q = rms_norm_forward(q, W["q_norm"], shape.eps)
            k, rstd_k = rms_norm_forward(k, W["k_norm"], shape.eps)
        q = rope_forward(q, select_rows(cos, rows), select_rows(sin, rows))
        k = rope_forward(k, cos, sin)
    kb, vb = k.view(B, L, Hkv, D), v.view(B, L, Hkv, D)
    if rows is None:
        o, lse = attention_forward(q.view(B, L, H, D), kb, vb, layout)
    else:
        o = attention_forward_rows(q, kb, vb, lse, layout, rows)
    o = o.reshape(-1, H * D)
    residual = select_rows(xf, rows if kept is None else kept.local)
    x2 = _residual_out(o, residual, W, "wo", kept)  # residual add inside the GEMM
    x2 = _lora(x2, o, W, "wo", drop, rows)
    h2, rstd2 = rms_norm_forward(x2, W["post_norm"], shape.eps)
    h2 = _gathered(h2, kept)
    if PERF["fused_gate_up"]:
        # g, u: column views of one [n, 2F] output (the SwiGLU kernels take them).
        gu = h2 @ _cat(W["wg"], W["wu"]).t()
        F = W["wg"].shape[0]
        g, u = gu[:, :F], gu[:, F:]
    else:
        g, u = h2 @ W["wg"].t(), h2 @ W["wu"].t()
    g, u = _lora(g, h2, W, "wg", drop, rows), _lora(u, h2, W, "wu", drop, rows)
    gathered = (h1, h2) if splits is not None and recomputing else (None, None)
    return Activations(rstd1, q, k, v, o, lse, x2, rstd2, g, u, q_lin, k_lin, rstd_q, rstd_k, *gathered)


def _scatter(t: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    """Rows idx of a full-size [N, ...] buffer; other rows are never read."""
    return t.new_empty(N, *t.shape[1:]).index_copy_(0, idx, t)


def _add(dW: dict, name: str, g: torch.Tensor) -> None:
    dW[name] = g if name not in dW else dW[name] + g


def _backward(dy, xf, cos, sin, a: Activations, W: dict, drop: AdapterDropout, shape: LayerShape,
              layout, idx, local, need, extra=None, kv_mask=None, key_rows=None, dx_mask=None,
              split=None, compact=False):  # fmt: skip
    """The compact backward of one layer. dy: [N, d] (the layer output's gradient);
    idx: the backward's rows [n] (None: every row); extra: the sampled filtered
    rows among them and their K/V-gradient weight (Plan.rows_for); local: the index through which the
    row-local activations of ``a`` (q, o, x2, rstd2, g, u, q_lin, rstd_q) are
    read: idx when they were saved full size, None when they are compact.
    kv_mask: [N] bool, the dense path of the amplified backward (idx None): the
    K/V gradients of rows outside it are zeroed (Plan.kv_mask_for).
    key_rows: filtered rows whose K/V gradient from the rows idx reaches the K/V
    projections only (Plan.key_rows_for: ``kv_projections`` on the compact path).
    dx_mask: [N] bool, rows whose input gradient leaves the layer, zeros elsewhere
    (Plan.dx_mask_for: the dense path).
    need: weight name -> whether it wants a gradient (frozen weights, e.g. under
    LoRA, get no weight-gradient GEMM). Returns dx [N, d] (zeros outside idx)
    and the weight gradients by name.
    split: tensor parallelism, the RowSplit of idx: dy, xf, rstd1 (and x2, rstd2
    unless ``compact``, the recompute's) are this rank's rows; the row-wise
    parts (norms, residuals) run on its rows of idx, and the GEMMs of its
    weight shards on all of idx, gathered (the kept rows only under Centrifuge)."""
    B, L = layout.shape
    N, H, Hkv, D = B * L, shape.num_heads, shape.num_kv_heads, shape.head_dim
    F = a.g.shape[1]
    dW = {}
    # Saved activations are read through idx by the row-wise kernels (no
    # gathered copies on CUDA); only dY, o and the kernels' compact outputs
    # are [n_keep, .] buffers, and they feed the GEMMs (M = n_keep).

    # Row-wise (sequence-parallel) reads: this rank's rows of idx.
    own = idx if split is None else split.local
    own_saved = None if compact else own  # how x2, rstd2 are read
    # MLP: one kernel recomputes a = silu(g) u and writes [dg du] side by side.
    dy_own = select_rows(dy, own)
    dy = _gathered(dy_own, split)
    da = dy @ W["wd"]
    m = drop.noise("wd", da, idx)
    if W["wd_lora_A"] is not None:  # ((dY B) A) ∘ m joins da before the SwiGLU backward
        _lora_dx(da, dy @ W["wd_lora_B"], W["wd_lora_A"], m)
    act, dgu = swiglu_backward_rows(da, a.g, a.u, local)
    if need["wd"]:
        dW["wd"] = dy.t() @ act
    _lora_backward(dW, dy, act, W, "wd", m=m)
    h2 = a.h2 if a.h2 is not None else _gathered(rms_norm_apply_rows(a.x2, a.rstd2, W["post_norm"],
                                                                      own_saved), split)  # fmt: skip
    if need["wg"] or need["wu"]:
        dgu_w = dgu.t() @ h2  # [2F, d]: dWg over dWu
        dW["wg"], dW["wu"] = dgu_w[:F], dgu_w[F:]
    if PERF["fused_gate_up"]:
        dh2 = dgu @ _cat(W["wg"], W["wu"])
    else:
        dh2 = torch.addmm(dgu[:, :F] @ W["wg"], dgu[:, F:], W["wu"])
    _lora_backward(dW, dgu[:, :F], h2, W, "wg", dh2, drop.noise("wg", h2, idx))
    _lora_backward(dW, dgu[:, F:], h2, W, "wu", dh2, drop.noise("wu", h2, idx))
    if split is not None:
        dh2 = split.reduce(dh2)
    # The residual gradient dy is added inside the norm's backward.
    dx2_own, dW["post_norm"] = rms_norm_backward_rows(dh2, a.x2, a.rstd2, W["post_norm"], own_saved,
                                                      dy_own)  # fmt: skip
    dx2 = _gathered(dx2_own, split)

    # Attention: dQ for kept queries over all keys, dK/dV for kept keys only.
    o_rows = select_rows(a.o, local)
    if need["wo"]:
        dW["wo"] = dx2.t() @ o_rows
    do = _lora_backward(dW, dx2, o_rows, W, "wo", dx2 @ W["wo"], drop.noise("wo", o_rows, idx))
    do = do.view(-1, H, D)
    q, o = a.q, a.o
    if local is None and idx is not None:  # compact recompute: the kernels read q, o at idx
        q, o = _scatter(q, idx, N), _scatter(o, idx, N)
    attn = (q.view(B, L, H, D), a.k.view(B, L, Hkv, D), a.v.view(B, L, Hkv, D), o.view(B, L, H, D),
            a.lse, do, layout, idx)  # fmt: skip
    if key_rows is None:
        dq, dk, dv = attention_backward(*attn, extra=extra)
    else:
        dq, dk, dv, dk_keys, dv_keys = attention_backward_key_rows(*attn, key_rows, extra=extra)
    if kv_mask is not None:  # filtered keys stay constants: no gradient reaches their rows
        m = kv_mask.to(dk.dtype)[:, None, None]
        dk, dv = dk * m, dv * m
    # dq, dk (after the RoPE transpose) and dv side by side: one weight GEMM.
    n = dq.shape[0]
    dqkv = dq.new_empty(n, (H + 2 * Hkv) * D)
    dq_out = dqkv[:, : H * D].view(n, H, D)
    dk_out = dqkv[:, H * D : (H + Hkv) * D].view(n, Hkv, D)
    if W["q_norm"] is None:
        rope_backward_rows(dq, cos, sin, idx, out=dq_out)
        rope_backward_rows(dk, cos, sin, idx, out=dk_out)
    else:  # Qwen3's q/k norm sits before RoPE: RoPE backward, then the norm's.
        dq, dk = rope_backward_rows(dq, cos, sin, idx), rope_backward_rows(dk, cos, sin, idx)
        dq, dW["q_norm"] = rms_norm_backward_rows(dq, a.q_lin, a.rstd_q, W["q_norm"], local)
        dk, dW["k_norm"] = rms_norm_backward_rows(dk, a.k_lin, a.rstd_k, W["k_norm"], idx)
        dq_out.copy_(dq)
        dk_out.copy_(dk)
    dqkv[:, (H + Hkv) * D :].copy_(dv.reshape(n, Hkv * D))
    if a.h1 is not None:
        h1 = select_rows(a.h1, idx)
    else:
        h1 = _gathered(rms_norm_apply_rows(xf, a.rstd1, W["input_norm"], own), split)
    if need["wq"] or need["wk"] or need["wv"]:
        dqkv_w = dqkv.t() @ h1
        dW["wq"], dW["wk"], dW["wv"] = dqkv_w.split([H * D, Hkv * D, Hkv * D])
    if W["bq"] is not None and (need["bq"] or need["bk"] or need["bv"]):
        dW["bq"], dW["bk"], dW["bv"] = dqkv.sum(0).split([H * D, Hkv * D, Hkv * D])
    if _fuse_qkv(W):  # one GEMM with K = (H + 2 Hkv) D instead of three
        dh1 = dqkv @ _cat(W["wq"], W["wk"], W["wv"])
    else:
        dh1 = dqkv[:, : H * D] @ W["wq"]
        dh1 = torch.addmm(dh1, dqkv[:, H * D : (H + Hkv) * D], W["wk"])
        dh1 = torch.addmm(dh1, dqkv[:, (H + Hkv) * D :], W["wv"])
    for p, dcols in zip(("wq", "wk", "wv"), dqkv.split([H * D, Hkv * D, Hkv * D], dim=1)):
        _lora_backward(dW, dcols, h1, W, p, dh1, drop.noise(p, h1, idx))
    if split is not None:
        dh1 = split.reduce(dh1)
    # The layer's one full-size write: dx of kept rows, zeros elsewhere.
    dx, dW["input_norm"] = rms_norm_backward_rows(
        dh1, xf, a.rstd1, W["input_norm"], own, dx2_own, scatter=True
    )
    if key_rows is not None:
        _key_rows_backward(dW, dk_keys, dv_keys, xf, cos, sin, a, W, drop, shape, key_rows.idx, need)
    if dx_mask is not None:
        dx = dx * dx_mask.to(dx.dtype)[:, None]
    return dx, dW


def _key_rows_backward(dW, dk, dv, xf, cos, sin, a: Activations, W: dict, drop: AdapterDropout,
                       shape: LayerShape, rows, need) -> None:  # fmt: skip
    """Adds to dW what the K/V gradients dk, dv [m, Hkv, D] of the filtered rows
    ``rows`` ([m] flat indices) give the K/V projections (weights, biases, LoRA
    adapters), the k norm and the input norm's weight (``kv_projections``). No
    input gradient: those rows' residual stream gets none. The GEMMs have
    M = m and N = Hkv * D (small under GQA)."""
    m, Hkv, D = dk.shape
    dk = rope_backward_rows(dk, cos, sin, rows)
    if W["k_norm"] is not None:
        dk, dkn = rms_norm_backward_rows(dk, a.k_lin, a.rstd_k, W["k_norm"], rows)
        _add(dW, "k_norm", dkn)
    dk, dv = dk.reshape(m, Hkv * D), dv.reshape(m, Hkv * D)
    h1 = rms_norm_apply_rows(xf, a.rstd1, W["input_norm"], rows)
    dh1 = torch.addmm(dk @ W["wk"], dv, W["wv"])
    for p, dcols in (("wk", dk), ("wv", dv)):
        if need[p]:
            _add(dW, p, dcols.t() @ h1)
        if W["b" + p[1]] is not None and need["b" + p[1]]:
            _add(dW, "b" + p[1], dcols.sum(0))
        lora = {}
        _lora_backward(lora, dcols, h1, W, p, dh1, drop.noise(p, h1, rows))
        for name, g in lora.items():
            _add(dW, name, g)
    _, dw = rms_norm_backward_rows(dh1, xf, a.rstd1, W["input_norm"], rows)
    _add(dW, "input_norm", dw)


_N_ACTS = len(fields(Activations))


class DecoderLayerFunction(torch.autograd.Function):
    """One decoder layer: dense forward, backward on the plan's kept rows.

    recompute=False saves the activations the backward reads (full size: which
    rows are kept is only known after the loss). recompute=True (activation
    checkpointing) saves only the input x and the attention's lse, and the
    backward recomputes the rest: with a compact plan only K/V for every row,
    everything else for the kept rows (:func:`_forward` with ``rows``)."""

    @staticmethod
    def forward(ctx, x, cos, sin, plan: Plan, shape: LayerShape, recompute: bool, dropout: dict,
                *weights):  # fmt: skip
        W = dict(zip(WEIGHT_NAMES, weights))
        d, D = x.shape[-1], shape.head_dim
        xf = x.reshape(-1, d)
        cos2, sin2 = cos.reshape(-1, D), sin.reshape(-1, D)
        drop = AdapterDropout(dropout)
        every = None if shape.tp is None else shape.tp.split(plan, None)
        splits = None if every is None else (every, every)
        a = _forward(xf, cos2, sin2, W, drop, shape, plan.layout, splits=splits)
        act = swiglu_forward(a.g, a.u)
        y = _lora(_residual_out(act, a.x2, W, "wd", every), act, W, "wd", drop)
        # h1, h2 and the SwiGLU output are recomputed on kept rows in the backward.
        acts = (a.lse,) if recompute else tuple(getattr(a, f.name) for f in fields(a))
        ctx.save_for_backward(xf, cos2, sin2, *acts, *weights)
        ctx.plan, ctx.shape, ctx.recompute, ctx.drop = plan, shape, recompute, drop
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xf, cos, sin, *rest = ctx.saved_tensors
        plan, shape = ctx.plan, ctx.shape
        i = shape.layer_index
        idx, extra = plan.rows_for(i)  # idx None: dense backward, every row
        split = splits = None
        if shape.tp is not None:
            split = shape.tp.split(plan, idx)
            splits = (shape.tp.split(plan, None), split)
        if ctx.recompute:
            weights = rest[1:]
            W = dict(zip(WEIGHT_NAMES, weights))
            a = _forward(xf, cos, sin, W, ctx.drop, shape, plan.layout, idx, rest[0], splits)
            local = None
        else:
            weights = rest[_N_ACTS:]
            W = dict(zip(WEIGHT_NAMES, weights))
            a, local = Activations(*rest[:_N_ACTS]), idx
        need = dict(zip(WEIGHT_NAMES, ctx.needs_input_grad[7:]))
        dx, dW = _backward(
            dy.reshape(xf.shape), xf, cos, sin, a, W, ctx.drop, shape, plan.layout, idx, local,
            need, extra, plan.kv_mask_for(i), plan.key_rows_for(i), plan.dx_mask_for(i), split,
            ctx.recompute,
        )  # fmt: skip
        grads = [
            dW[name].to(w.dtype) if w is not None and need[name] else None
            for name, w in zip(WEIGHT_NAMES, weights)
        ]
        return (dx.view(dy.shape), None, None, None, None, None, None, *grads)


def is_plain_linear(m) -> bool:
    # A quantized (or otherwise wrapped) layer replaces the module or its
    # forward: its weight alone would not be what the model computes.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def projection_weights(m, where: str):
    """(weight, bias, lora_A, lora_B, scaling, dropout) of a projection module: a
    plain nn.Linear, or a peft LoRA layer around one (lora_* None without an
    active, unmerged adapter). dropout: the probability with which the adapter
    drops its input elements in this call (0 in eval mode). Raises for what the
    compact layer cannot compute exactly."""
    if is_plain_linear(m):
        return m.weight, m.bias, None, None, None, 0.0
    base = getattr(m, "base_layer", None)
    if base is None or not hasattr(m, "lora_A"):
        raise TypeError(
            f"{where} is a {type(m).__name__}: Centrifuge supports plain nn.Linear projections "
            "and peft LoRA layers around them (quantized layers are not supported)"
        )
    if not is_plain_linear(base):
        raise TypeError(f"{where}: LoRA around a {type(base).__name__} is not supported "
                        "(quantized base layers are not)")  # fmt: skip
    if m.merged or m.disable_adapters:  # peft computes base_layer(x) alone then
        return base.weight, base.bias, None, None, None, 0.0
    active = [name for name in m.active_adapters if name in m.lora_A]
    if not active:
        return base.weight, base.bias, None, None, None, 0.0
    if len(active) > 1:
        raise NotImplementedError(f"{where}: several active LoRA adapters {active} are not supported")
    name = active[0]
    if m.use_dora.get(name) or name in getattr(m, "lora_variant", {}):
        raise NotImplementedError(f"{where}: DoRA and other LoRA variants are not supported (plain LoRA is)")
    dropout = m.lora_dropout[name]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        raise NotImplementedError(
            f"{where}: lora_dropout as a {type(dropout).__name__} is not supported (nn.Dropout is)"
        )
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if p >= 1:  # peft's adapter would see zeros: the adapter would do nothing
        raise ValueError(f"{where}: lora_dropout must be below 1, got {p}")
    A, B = m.lora_A[name], m.lora_B[name]
    if not (is_plain_linear(A) and is_plain_linear(B)) or A.bias is not None or B.bias is not None:
        raise NotImplementedError(f"{where}: LoRA adapters with a bias (lora_bias) are not supported")
    return base.weight, base.bias, A.weight, B.weight, m.scaling[name], p


def layer_weights(layer) -> tuple[dict, dict]:
    """(weights, dropout) of a Llama-family decoder layer: the weights keyed by
    WEIGHT_NAMES (None where absent), LoRA adapters included; the adapters that
    drop their input in this call, projection name -> probability
    (:class:`AdapterDropout`). Native and transformers layers use the same
    attribute names."""
    w = dict(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight)
    dropout = {}
    for p, (block, attr) in PROJECTIONS.items():
        module = getattr(getattr(layer, block), attr)
        weight, bias, A, B, scaling, drop = projection_weights(module, f"{block}.{attr}")
        w.update({p: weight, f"{p}_lora_A": A, f"{p}_lora_B": None if B is None else B * scaling})
        if drop > 0:
            dropout[p] = drop
        if p in ("wq", "wk", "wv"):
            w["b" + p[1]] = bias
    a = layer.self_attn
    if hasattr(a, "q_norm"):
        w.update(q_norm=a.q_norm.weight, k_norm=a.k_norm.weight)
    return w, dropout


# Not traced by torch.compile: a traced backward would read the plan as it was at
# the forward, before the loss filled it (docs/design.md, "torch.compile").
@torch.compiler.disable
def decoder_layer(x, cos, sin, plan: Plan, shape: LayerShape, weights: dict, recompute=False,
                  dropout: dict | None = None):  # fmt: skip
    """x: [B, L, d]; cos, sin: [B, L, head_dim]; weights keyed by WEIGHT_NAMES.
    recompute: activation checkpointing (save x and the attention lse, recompute
    the rest in the backward, on the kept rows where the plan is compact).
    dropout: LoRA adapters' input dropout, projection name -> p (layer_weights)."""
    return DecoderLayerFunction.apply(
        x, cos, sin, plan, shape, recompute, dropout or {}, *(weights.get(n) for n in WEIGHT_NAMES)
    )
