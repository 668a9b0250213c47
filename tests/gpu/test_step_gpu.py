"""GPU tests of the whole-step structure (skipped without CUDA): cuDNN's attention
forward against the reference (contiguous and strided inputs, GQA), the filtered
Triton backward fed by it, the dispatch's fall-back for packed batches, and one
decoder layer under every structure switch (fused QKV / gate-up GEMMs, forward
backend) against the CPU reference path.

    python -m pytest tests/gpu/test_step_gpu.py
"""

from __future__ import annotations

import pytest
import torch

import centrifuge.models.layer as layer_mod
import centrifuge.ops.attention as attn
from centrifuge.ops import attention_triton as at
from centrifuge.plan import Layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qkv_inputs(B, L, H, Hkv, D, dtype, seed, strided):
    """q [B, L, H, D], k, v [B, L, Hkv, D]; strided: column views of one
    [B*L, (H + 2 Hkv) D] buffer, the way the fused projection produces them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    buf = torch.randn(B * L, (H + 2 * Hkv) * D, device="cuda", dtype=dtype, generator=g)
    q = buf[:, : H * D].view(B, L, H, D)
    k = buf[:, H * D : (H + Hkv) * D].view(B, L, Hkv, D)
    v = buf[:, (H + Hkv) * D :].view(B, L, Hkv, D)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,H,Hkv", [(64, 8, 2), (128, 4, 4), (64, 6, 1)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("L", [256, 333])
def test_cudnn_forward_matches_reference(dtype, D, H, Hkv, strided, L):
    B = 2
    q, k, v = qkv_inputs(B, L, H, Hkv, D, dtype, seed=L + D + H, strided=strided)
    layout = Layout.build(B, L, "cuda")
    assert at.cudnn_forward_possible(q, layout)
    o, lse = at.attention_forward_cudnn(q, k, v, layout)
    o_ref, lse_ref = attn.attention_forward_reference(q.float(), k.float(), v.float(), layout)
    assert o.shape == q.shape and o.dtype == dtype and torch.isfinite(o).all()
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    assert rel(o, o_ref) < TOL[dtype], f"o: {rel(o, o_ref):.2e}"
    assert rel(lse, lse_ref) < 1e-3, f"lse: {rel(lse, lse_ref):.2e}"


def test_cudnn_expanded_kv_matches_native_gqa():
    q, k, v = qkv_inputs(2, 300, 8, 2, 64, torch.bfloat16, seed=5, strided=True)
    layout = Layout.build(2, 300, "cuda")
    o1, lse1 = at.attention_forward_cudnn(q, k, v, layout)
    old = at.CUDNN_EXPAND_KV
    at.CUDNN_EXPAND_KV = True
    try:
        o2, lse2 = at.attention_forward_cudnn(q, k, v, layout)
    finally:
        at.CUDNN_EXPAND_KV = old
    assert rel(o1, o2) < 1e-2 and rel(lse1, lse2) < 1e-4


@pytest.mark.parametrize("ratio", [0.3, 1.0, None])
def test_filtered_backward_from_cudnn_forward(ratio, monkeypatch):
    """The Triton backward reads cuDNN's o and lse (their layouts, strides)."""
    monkeypatch.setattr(attn, "FORWARD_BACKEND", "cudnn")
    B, L, H, Hkv, D, dtype = 2, 517, 8, 2, 64, torch.bfloat16
    q, k, v = qkv_inputs(B, L, H, Hkv, D, dtype, seed=11, strided=True)
    layout = Layout.build(B, L, "cuda")
    o, lse = attn.attention_forward(q, k, v, layout)
    g = torch.Generator(device="cuda").manual_seed(12)
    keep_idx = None
    if ratio is not None:
        keep_idx = torch.nonzero(torch.rand(B * L, device="cuda", generator=g) < ratio).squeeze(1)
    n = B * L if keep_idx is None else keep_idx.numel()
    do = torch.randn(n, H, D, device="cuda", dtype=dtype, generator=g)
    o_ref, lse_ref = attn.attention_forward_reference(q.float(), k.float(), v.float(), layout)
    ref = attn.attention_backward_reference(
        q.float(), k.float(), v.float(), o_ref, lse_ref, do.float(), layout, keep_idx
    )
    out = attn.attention_backward(q, k, v, o, lse, do, layout, keep_idx)
    for name, a, b in zip(("dq", "dk", "dv"), out, ref):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < TOL[dtype], f"{name}: relative error {rel(a, b):.2e}"


def test_cudnn_backend_falls_back_to_flash_for_packed(monkeypatch):
    monkeypatch.setattr(attn, "FORWARD_BACKEND", "cudnn")
    B, L = 2, 400
    pos = torch.cat([torch.arange(150), torch.arange(250)]).expand(B, L)
    layout = Layout.build(B, L, "cuda", position_ids=pos)
    q, k, v = qkv_inputs(B, L, 8, 2, 64, torch.bfloat16, seed=3, strided=True)
    assert not at.cudnn_forward_possible(q, layout)
    o, lse = attn.attention_forward(q, k, v, layout)
    o_f, lse_f = at.attention_forward_flash(q, k, v, layout)
    assert torch.equal(o, o_f) and torch.equal(lse, lse_f)


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("fused_qkv,fused_gate_up", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_structure_vs_cpu_reference(backend, fused_qkv, fused_gate_up, bias, monkeypatch):
    from test_rowwise_gpu import check_layer

    monkeypatch.setattr(attn, "FORWARD_BACKEND", backend)
    monkeypatch.setitem(layer_mod.PERF, "fused_qkv", fused_qkv)
    monkeypatch.setitem(layer_mod.PERF, "fused_gate_up", fused_gate_up)
    check_layer(torch.bfloat16, bias=bias)


def test_layer_qk_norm_with_cudnn_forward(monkeypatch):
    from test_rowwise_gpu import check_layer

    monkeypatch.setattr(attn, "FORWARD_BACKEND", "cudnn")
    check_layer(torch.bfloat16, qk_norm=True)


def test_cudnn_failure_falls_back_to_flash_once(monkeypatch):
    monkeypatch.setattr(attn, "FORWARD_BACKEND", "cudnn")
    monkeypatch.setattr(at, "_cudnn_failure", [None])
    calls = []

    def refuse(*a, **k):
        calls.append(1)
        raise RuntimeError("no fused attention in this cuDNN")

    monkeypatch.setattr(at, "attention_forward_cudnn", refuse)
    q, k, v = qkv_inputs(2, 128, 8, 2, 64, torch.bfloat16, seed=9, strided=False)
    layout = Layout.build(2, 128, "cuda")
    with pytest.warns(UserWarning, match="cuDNN attention failed"):
        o, lse = attn.attention_forward(q, k, v, layout)
    o_f, lse_f = at.attention_forward_flash(q, k, v, layout)
    assert torch.equal(o, o_f) and torch.equal(lse, lse_f)
    attn.attention_forward(q, k, v, layout)
    assert len(calls) == 1  # not retried
