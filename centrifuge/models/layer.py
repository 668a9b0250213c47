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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from centrifuge.ops.attention import attention_backward, attention_forward
from centrifuge.ops.rmsnorm import rms_norm_apply_rows, rms_norm_backward_rows, rms_norm_forward
from centrifuge.ops.rope import rope_backward_rows, rope_forward
from centrifuge.ops.swiglu import swiglu_backward_rows, swiglu_forward
from centrifuge.plan import Plan

# The order in which a layer's weights enter the Function (None where absent).
WEIGHT_NAMES = (
    "input_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm",
    "wo", "post_norm", "wg", "wu", "wd",
)  # fmt: skip


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    layer_index: int = 0  # position in the stack: Plan.rows_for(layer_index) picks the rows


def _linear(x, w, b=None):
    # addmm folds the bias (or a residual) into the GEMM's epilogue: no extra pass.
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t[idx]


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


def _split_heads(qkv: torch.Tensor, N: int, H: int, Hkv: int, D: int):
    """[N, (H + 2 Hkv) D] -> views q [N, H, D], k, v [N, Hkv, D] (row stride kept)."""
    q = qkv[:, : H * D].view(N, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (H + Hkv) * D :].view(N, Hkv, D)
    return q, k, v


class DecoderLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, plan: Plan, shape: LayerShape, *weights):
        W = dict(zip(WEIGHT_NAMES, weights))
        B, L, d = x.shape
        N, H, Hkv, D = B * L, shape.num_heads, shape.num_kv_heads, shape.head_dim
        xf = x.reshape(N, d)
        h1, rstd1 = rms_norm_forward(xf, W["input_norm"], shape.eps)
        cos2, sin2 = cos.reshape(N, D), sin.reshape(N, D)
        q_lin = k_lin = rstd_q = rstd_k = None
        if _fuse_qkv(W):
            # One GEMM against [Wq; Wk; Wv] (the K/V projections alone are skinny,
            # N = Hkv*D); q, k, v stay column views of its output and RoPE rotates
            # q and k in place, so the saved bytes are those of q, k, v.
            qkv = _linear(h1, _cat(W["wq"], W["wk"], W["wv"]), _cat(W["bq"], W["bk"], W["bv"]))
            q, k, v = _split_heads(qkv, N, H, Hkv, D)
            rope_forward(q, cos2, sin2, out=q)
            rope_forward(k, cos2, sin2, out=k)
        else:
            q = _linear(h1, W["wq"], W["bq"]).view(N, H, D)
            k = _linear(h1, W["wk"], W["bk"]).view(N, Hkv, D)
            v = _linear(h1, W["wv"], W["bv"]).view(N, Hkv, D)
            if W["q_norm"] is not None:
                q_lin, k_lin = q, k
                q, rstd_q = rms_norm_forward(q, W["q_norm"], shape.eps)
                k, rstd_k = rms_norm_forward(k, W["k_norm"], shape.eps)
            q = rope_forward(q, cos2, sin2)
            k = rope_forward(k, cos2, sin2)
        o, lse = attention_forward(
            q.view(B, L, H, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D), plan.layout
        )
        x2 = _linear(o.reshape(N, H * D), W["wo"], xf)  # residual add inside the GEMM
        h2, rstd2 = rms_norm_forward(x2, W["post_norm"], shape.eps)
        if PERF["fused_gate_up"]:
            # g, u: column views of one [N, 2F] output (the SwiGLU kernels take them).
            gu = h2 @ _cat(W["wg"], W["wu"]).t()
            F = W["wg"].shape[0]
            g, u = gu[:, :F], gu[:, F:]
        else:
            g, u = h2 @ W["wg"].t(), h2 @ W["wu"].t()
        y = _linear(swiglu_forward(g, u), W["wd"], x2)
        # Saved full size: which rows are kept is only known after the loss.
        # h1, h2 and a are recomputed on kept rows in the backward instead.
        ctx.save_for_backward(
            xf, rstd1, q, k, v, o, lse, x2, rstd2, g, u, cos2, sin2,
            q_lin, k_lin, rstd_q, rstd_k, *weights,
        )  # fmt: skip
        ctx.plan, ctx.shape, ctx.dims = plan, shape, (B, L, d)
        return y.view(B, L, d)

    @staticmethod
    def backward(ctx, dy):
        (xf, rstd1, q, k, v, o, lse, x2, rstd2, g, u, cos, sin,
         q_lin, k_lin, rstd_q, rstd_k, *weights) = ctx.saved_tensors  # fmt: skip
        W = dict(zip(WEIGHT_NAMES, weights))
        plan, shape = ctx.plan, ctx.shape
        B, L, d = ctx.dims
        H, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
        idx, extra = plan.rows_for(shape.layer_index)  # idx None: dense backward, every row
        F = g.shape[1]
        dW = {}
        # Saved activations are read through idx by the row-wise kernels (no
        # gathered copies on CUDA); only dY, o and the kernels' compact outputs
        # are [n_keep, .] buffers, and they feed the GEMMs (M = n_keep).

        # MLP: one kernel recomputes a = silu(g) u and writes [dg du] side by side.
        dy = _rows(dy.reshape(B * L, d), idx)
        a, dgu = swiglu_backward_rows(dy @ W["wd"], g, u, idx)
        dW["wd"] = dy.t() @ a
        h2 = rms_norm_apply_rows(x2, rstd2, W["post_norm"], idx)
        dgu_w = dgu.t() @ h2  # [2F, d]: dWg over dWu
        dW["wg"], dW["wu"] = dgu_w[:F], dgu_w[F:]
        if PERF["fused_gate_up"]:
            dh2 = dgu @ _cat(W["wg"], W["wu"])
        else:
            dh2 = torch.addmm(dgu[:, :F] @ W["wg"], dgu[:, F:], W["wu"])
        # The residual gradient dy is added inside the norm's backward.
        dx2, dW["post_norm"] = rms_norm_backward_rows(dh2, x2, rstd2, W["post_norm"], idx, dy)

        # Attention: dQ for kept queries over all keys, dK/dV for kept keys only.
        dW["wo"] = dx2.t() @ _rows(o.reshape(B * L, H * D), idx)
        do = (dx2 @ W["wo"]).view(-1, H, D)
        dq, dk, dv = attention_backward(
            q.view(B, L, H, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D),
            o, lse, do, plan.layout, idx, extra=extra,
        )  # fmt: skip
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
            dq, dW["q_norm"] = rms_norm_backward_rows(dq, q_lin, rstd_q, W["q_norm"], idx)
            dk, dW["k_norm"] = rms_norm_backward_rows(dk, k_lin, rstd_k, W["k_norm"], idx)
            dq_out.copy_(dq)
            dk_out.copy_(dk)
        dqkv[:, (H + Hkv) * D :].copy_(dv.reshape(n, Hkv * D))
        h1 = rms_norm_apply_rows(xf, rstd1, W["input_norm"], idx)
        dqkv_w = dqkv.t() @ h1
        dW["wq"], dW["wk"], dW["wv"] = dqkv_w.split([H * D, Hkv * D, Hkv * D])
        if W["bq"] is not None:
            dW["bq"], dW["bk"], dW["bv"] = dqkv.sum(0).split([H * D, Hkv * D, Hkv * D])
        if _fuse_qkv(W):  # one GEMM with K = (H + 2 Hkv) D instead of three
            dh1 = dqkv @ _cat(W["wq"], W["wk"], W["wv"])
        else:
            dh1 = dqkv[:, : H * D] @ W["wq"]
            dh1 = torch.addmm(dh1, dqkv[:, H * D : (H + Hkv) * D], W["wk"])
            dh1 = torch.addmm(dh1, dqkv[:, (H + Hkv) * D :], W["wv"])
        # The layer's one full-size write: dx of kept rows, zeros elsewhere.
        dx, dW["input_norm"] = rms_norm_backward_rows(
            dh1, xf, rstd1, W["input_norm"], idx, dx2, scatter=True
        )
        grads = [
            None if w is None else dW[name].to(w.dtype) for name, w in zip(WEIGHT_NAMES, weights)
        ]
        return (dx.view(B, L, d), None, None, None, None, *grads)


def layer_weights(layer) -> dict:
    """The weights of a Llama-family decoder layer keyed by WEIGHT_NAMES (None where
    absent). Native and transformers layers use the same attribute names."""
    a, m = layer.self_attn, layer.mlp
    w = dict(
        input_norm=layer.input_layernorm.weight, wq=a.q_proj.weight, wk=a.k_proj.weight,
        wv=a.v_proj.weight, bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias,
        wo=a.o_proj.weight, post_norm=layer.post_attention_layernorm.weight,
        wg=m.gate_proj.weight, wu=m.up_proj.weight, wd=m.down_proj.weight,
    )  # fmt: skip
    if hasattr(a, "q_norm"):
        w.update(q_norm=a.q_norm.weight, k_norm=a.k_norm.weight)
    return w


def decoder_layer(x, cos, sin, plan: Plan, shape: LayerShape, weights: dict):
    """x: [B, L, d]; cos, sin: [B, L, head_dim]; weights keyed by WEIGHT_NAMES."""
    return DecoderLayerFunction.apply(
        x, cos, sin, plan, shape, *(weights.get(n) for n in WEIGHT_NAMES)
    )
