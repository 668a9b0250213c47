"""Every op's compact backward against autograd of its plain reference."""

import pytest
import torch

from centrifuge.ops.attention import (
    attention_backward_reference,
    attention_forward_reference,
    attention_reference,
)
from centrifuge.ops.linear_ce import (
    linear_cross_entropy_backward,
    linear_cross_entropy_forward,
    linear_cross_entropy_reference,
)
from centrifuge.ops.rmsnorm import rms_norm_backward, rms_norm_forward, rms_norm_reference
from centrifuge.ops.rope import (
    inv_frequencies,
    rope_backward,
    rope_cos_sin,
    rope_reference,
)
from centrifuge.ops.swiglu import swiglu_backward, swiglu_reference
from centrifuge.plan import Layout

F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kept_rows(n, ratio, g):
    idx = torch.nonzero(torch.rand(n, generator=g) < ratio).squeeze(1)
    return idx if idx.numel() else torch.tensor([n // 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rmsnorm(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 29, 19
    x = torch.randn(n, d, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(d, generator=g, dtype=F64, requires_grad=True)
    y_ref = rms_norm_reference(x, w, 1e-5)
    y, rstd = rms_norm_forward(x.detach(), w.detach(), 1e-5)
    assert rel(y, y_ref) < 1e-14
    idx = kept_rows(n, 0.4, g)
    dy = torch.zeros(n, d, dtype=F64)
    dy[idx] = torch.randn(idx.numel(), d, generator=g, dtype=F64)
    y_ref.backward(dy)
    dx, dw = rms_norm_backward(dy[idx], x.detach()[idx], rstd[idx], w.detach())
    assert rel(dx, x.grad[idx]) < 1e-12 and rel(dw, w.grad) < 1e-12


def test_rmsnorm_bf16_matches_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 64, generator=g).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16().requires_grad_()
    y_ref = rms_norm_reference(x, w, 1e-6)
    y, rstd = rms_norm_forward(x.detach(), w.detach(), 1e-6)
    assert torch.equal(y, y_ref)
    dy = torch.randn(33, 64, generator=g).bfloat16()
    y_ref.backward(dy)
    dx, dw = rms_norm_backward(dy, x.detach(), rstd, w.detach())
    assert rel(dx.float(), x.grad.float()) < 1e-2 and rel(dw, w.grad.float()) < 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_swiglu(seed):
    g = torch.Generator().manual_seed(seed)
    n, f = 23, 37
    a = torch.randn(n, f, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(n, f, generator=g, dtype=F64, requires_grad=True)
    da = torch.randn(n, f, generator=g, dtype=F64)
    swiglu_reference(a, b).backward(da)
    dg, du = swiglu_backward(da, a.detach(), b.detach())
    assert rel(dg, a.grad) < 1e-13 and rel(du, b.grad) < 1e-13


@pytest.mark.parametrize("scaling", [None, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=32)])
def test_rope(scaling):
    g = torch.Generator().manual_seed(5)
    n, H, D = 21, 3, 16
    inv = inv_frequencies(D, 10000.0, scaling)
    cos, sin = rope_cos_sin(torch.randint(0, 100, (n,), generator=g), inv, F64)
    x = torch.randn(n, H, D, generator=g, dtype=F64, requires_grad=True)
    dy = torch.randn(n, H, D, generator=g, dtype=F64)
    rope_reference(x, cos, sin).backward(dy)
    assert rel(rope_backward(dy, cos, sin), x.grad) < 1e-14


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192, rope_theta=500000.0)
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = inv_frequencies(64, 500000.0, rope)
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=0)


def _qkv(B, L, H, Hkv, D, g):
    """float64 q [B, L, H, D] and k, v [B, L, Hkv, D] that require grad."""
    q = torch.randn(B, L, H, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    return q, k, v


def _layout(B, L, packed, g):
    if not packed:
        return Layout.build(B, L)
    pos = []
    for _ in range(B):
        row, t = [], 0
        while len(row) < L:
            n = int(torch.randint(1, L // 2 + 2, (1,), generator=g))
            row.extend(range(n))
        pos.append(row[:L])
    return Layout.build(B, L, position_ids=torch.tensor(pos))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_filtered_attention_backward(seed, H, Hkv, packed, ratio):
    g = torch.Generator().manual_seed(seed)
    B, L, D = 2, 19, 8
    layout = _layout(B, L, packed, g)
    q, k, v = _qkv(B, L, H, Hkv, D, g)
    keep = torch.rand(B, L, generator=g) < ratio
    keep[0, 3] = True  # at least one kept row
    o_ref = attention_reference(q, k, v, layout.segment_ids, keep)
    o, lse = attention_forward_reference(q.detach(), k.detach(), v.detach(), layout)
    assert rel(o, o_ref) < 1e-13
    idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    do = torch.randn(idx.numel(), H, D, generator=g, dtype=F64)
    do_full = torch.zeros(B * L, H, D, dtype=F64).index_copy_(0, idx, do)
    o_ref.backward(do_full.view(B, L, H, D))
    dq, dk, dv = attention_backward_reference(
        q.detach(), k.detach(), v.detach(), o, lse, do, layout, idx
    )
    assert rel(dq, q.grad.reshape(B * L, H, D)[idx]) < 1e-12
    assert rel(dk, k.grad.reshape(B * L, Hkv, D)[idx]) < 1e-12
    assert rel(dv, v.grad.reshape(B * L, Hkv, D)[idx]) < 1e-12
    # The semantics: no gradient reaches a filtered row's q, k or v.
    for t in (q.grad, k.grad, v.grad):
        assert (t.reshape(B * L, -1)[~keep.reshape(-1)] == 0).all()


def test_dense_attention_backward_is_plain_autograd():
    g = torch.Generator().manual_seed(9)
    B, L, H, D = 2, 11, 2, 4
    layout = _layout(B, L, True, g)
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    o_ref = attention_reference(q, k, v, layout.segment_ids)
    do = torch.randn(B, L, H, D, generator=g, dtype=F64)
    o_ref.backward(do)
    o, lse = attention_forward_reference(q.detach(), k.detach(), v.detach(), layout)
    dq, dk, dv = attention_backward_reference(
        q.detach(), k.detach(), v.detach(), o, lse, do.reshape(B * L, H, D), layout, None
    )
    for ours, ref in ((dq, q), (dk, k), (dv, v)):
        assert rel(ours, ref.grad.reshape(B * L, H, D)) < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_cross_entropy(seed, monkeypatch):
    import centrifuge.ops.linear_ce as lce

    # Force several chunks so the chunk loop is exercised.
    monkeypatch.setattr(lce, "_chunk_rows", lambda n, v, budget=0: 7)
    g = torch.Generator().manual_seed(seed)
    n, d, V = 31, 12, 53
    x = torch.randn(n, d, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=F64, requires_grad=True)
    t = torch.randint(0, V, (n,), generator=g)
    t[::5] = -100
    ref = linear_cross_entropy_reference(x, w, t)
    loss, lse = linear_cross_entropy_forward(x.detach(), w.detach(), t)
    assert rel(loss, ref) < 1e-13
    idx = kept_rows(n, 0.5, g)
    dl = torch.zeros(n, dtype=F64)
    dl[idx] = torch.rand(idx.numel(), generator=g, dtype=F64)
    ref.backward(dl)
    dx, dw = linear_cross_entropy_backward(dl[idx], x.detach()[idx], w.detach(), t[idx], lse[idx])
    assert rel(dx, x.grad[idx]) < 1e-12 and rel(dw, w.grad) < 1e-12
