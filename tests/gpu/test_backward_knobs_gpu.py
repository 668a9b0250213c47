"""The quality knobs (BackwardOptions: sampled filtered rows, exact bottom
layers) on the GPU kernel path: the Triton filtered backward plus the row-wise
own-query correction, against the reference semantics in float64 on the same
weights, kept rows and sampled rows. Same yardstick as test_model_gpu.py: fp32
within tf32 error, bf16 as close to the float64 truth as plain bf16 autograd.

    python -m pytest tests/gpu/test_backward_knobs_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from centrifuge.models import build_model
from centrifuge.models.reference import reference_filtered_loss
from centrifuge.ops.attention import (
    attention_backward,
    attention_forward,
    attention_reference,
)
from centrifuge.plan import BackwardOptions, ExtraRows
from centrifuge.selection import Selector
from test_attention_gpu import packed_layout, rel
from test_model_gpu import CONFIGS, batch, grads, worst_rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("H,Hkv,D", [(8, 8, 64), (16, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_extra_rows_triton(H, Hkv, D, dtype):
    B, L = 2, 777
    g = torch.Generator(device="cuda").manual_seed(H + D)
    layout = packed_layout(B, L, seed=3, min_doc=50, max_doc=400, device="cuda")
    q, k, v = (torch.randn(B, L, h, D, device="cuda", dtype=dtype, generator=g) for h in (H, Hkv, Hkv))
    u = torch.rand(B, L, device="cuda", generator=g)
    keep, sampled = u < 0.4, (u >= 0.4) & (u < 0.55)
    w = 1 / 0.25
    weight = keep.double().masked_fill(sampled, w)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = attention_reference(q64, k64, v64, layout.segment_ids, weight)
    idx = torch.nonzero((keep | sampled).reshape(-1)).squeeze(1)
    do = torch.randn(idx.numel(), H, D, device="cuda", dtype=dtype, generator=g)
    do_full = torch.zeros(B * L, H, D, device="cuda", dtype=torch.float64)
    o64.backward(do_full.index_copy_(0, idx, do.double()).view(B, L, H, D))
    o, lse = attention_forward(q, k, v, layout)
    pos = torch.nonzero(sampled.reshape(-1)[idx]).squeeze(1)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, layout, idx, extra=ExtraRows(pos, w))
    for ours, ref in ((dq, q64), (dk, k64), (dv, v64)):
        want = ref.grad.reshape(B * L, -1, D)[idx]
        assert rel(ours, want) < 3e-2
        assert rel(ours[pos], want[pos]) < 3e-2  # the corrected rows themselves


@pytest.mark.parametrize("H,Hkv,D", [(8, 8, 64), (16, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_key_rows_triton(H, Hkv, D, dtype):
    """kv_projections' key rows on the Triton kernels (a second key set of the
    dK/dV kernel over the kept queries) against float64 autograd: the key rows'
    K/V gradient from the kept queries' output gradient, the kept rows' as
    without them."""
    from centrifuge.ops.attention import attention_backward_key_rows
    from centrifuge.plan import KeyRows, precedes

    B, L = 2, 777
    g = torch.Generator(device="cuda").manual_seed(H + D + 1)
    layout = packed_layout(B, L, seed=4, min_doc=50, max_doc=400, device="cuda")
    q, k, v = (torch.randn(B, L, h, D, device="cuda", dtype=dtype, generator=g) for h in (H, Hkv, Hkv))
    keep = torch.rand(B, L, device="cuda", generator=g) < 0.4
    idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    keys = torch.nonzero((precedes(keep, layout) & ~keep).reshape(-1)).squeeze(1)
    key_rows = KeyRows(keys, idx)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = attention_reference(q64, k64, v64, layout.segment_ids)  # every K/V differentiable
    do = torch.randn(idx.numel(), H, D, device="cuda", dtype=dtype, generator=g)
    do_full = torch.zeros(B * L, H, D, device="cuda", dtype=torch.float64)
    o64.backward(do_full.index_copy_(0, idx, do.double()).view(B, L, H, D))
    o, lse = attention_forward(q, k, v, layout)
    dq, dk, dv, dk_keys, dv_keys = attention_backward_key_rows(q, k, v, o, lse, do, layout, idx, key_rows)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3  # fp32 runs IEEE dots
    for ours, ref, rows in ((dq, q64, idx), (dk, k64, idx), (dv, v64, idx), (dk_keys, k64, keys),
                            (dv_keys, v64, keys)):  # fmt: skip
        assert rel(ours, ref.grad.reshape(B * L, -1, D)[rows]) < tol


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("knob", ["extra=0.3", "extra=0.5,extra_weight=1.5", "exact_layers=1",
                                  "extra=0.3,exact_layers=2", "kv_projections=1", "exact_top=1",
                                  "extra=0.3,kv_projections=1,exact_top=1",
                                  "kv_projections=1,path=dense"])  # fmt: skip
def test_model_gradients_with_knobs(name, knob):
    ids, kw = batch(seed=len(name) + len(knob), packed=True)
    model64 = build_model(CONFIGS[name], dtype=torch.float64, device="cuda", seed=0)
    opts = BackwardOptions.parse(knob, seed=4)
    out = model64(ids, labels=ids, backward=opts, **kw)  # draws the sampled rows
    keep = Selector("loss", 0.4)(out.token_loss, out.valid)
    out.plan.set_keep(keep)
    ref_kw = dict(out.plan.reference_knobs(keep), **kw)
    reference_filtered_loss(model64, ids, ids, keep, **ref_kw).backward()
    truth = grads(model64)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(CONFIGS[name], dtype=dtype, device="cuda", seed=0)
        out = model(ids, labels=ids, backward=BackwardOptions.parse(knob, seed=4), **kw)
        out.plan.loss(out.token_loss, keep).backward()  # same seed and shape: the same rows
        ours = grads(model)
        reference_filtered_loss(model, ids, ids, keep, **ref_kw).backward()
        errors[dtype] = (worst_rel(ours, truth), worst_rel(grads(model), truth))
    ours32, plain32 = errors[torch.float32]
    ours16, plain16 = errors[torch.bfloat16]
    assert ours32 < 5e-3, f"fp32 kernel path vs float64: {ours32:.2e} (plain fp32 {plain32:.2e})"
    assert ours16 < 2 * plain16 + 1e-3, f"bf16 kernel path {ours16:.2e} vs plain bf16 {plain16:.2e}"
