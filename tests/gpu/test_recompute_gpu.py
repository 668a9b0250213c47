"""GPU tests of activation checkpointing with the compact recompute and of LoRA
(skipped without CUDA): the kept-query attention forward kernel against its
reference at realistic shapes, and whole-model gradients with checkpointing
(and with peft LoRA adapters) against the float64 reference semantics, in the
style of test_model_gpu.py.

    python -m pytest tests/gpu/test_recompute_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from test_attention_gpu import packed_layout, rel
from test_model_gpu import CONFIGS, batch, grads, worst_rel

from centrifuge.models import build_model
from centrifuge.models.reference import reference_filtered_loss
from centrifuge.ops.attention import attention_forward
from centrifuge.ops.attention_recompute import attention_forward_rows_reference
from centrifuge.ops.attention_recompute_triton import attention_forward_rows_triton
from centrifuge.plan import Layout
from centrifuge.selection import Selector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,L,H,Hkv,D,packed,ratio",
    [(2, 2048, 32, 4, 64, False, 0.5), (2, 2048, 32, 4, 64, True, 0.3),
     (1, 4096, 24, 8, 128, False, 0.5), (3, 1000, 8, 8, 128, True, 1.0)],
)  # fmt: skip
def test_kept_query_forward_kernel_matches_reference(dtype, B, L, H, Hkv, D, packed, ratio):
    g = torch.Generator(device="cuda").manual_seed(B * L + D)
    layout = packed_layout(B, L, 0, 16, L // 2, device="cuda") if packed else Layout.build(B, L, "cuda")
    q = torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, L, Hkv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, L, Hkv, D, device="cuda", dtype=dtype, generator=g)
    o, lse = attention_forward(q, k, v, layout)  # the forward whose lse the layer saves
    idx = torch.nonzero(torch.rand(B * L, device="cuda", generator=g) < ratio).squeeze(1)
    q_rows = q.reshape(B * L, H, D)[idx]
    got = attention_forward_rows_triton(q_rows, k, v, lse, layout, idx)
    want = attention_forward_rows_reference(q_rows.float(), k.float(), v.float(), lse, layout, idx)
    assert rel(got, want) < 2e-2  # bf16/fp16 rounding of o (test_attention_gpu.TOL)
    assert rel(got, o.reshape(B * L, H, D)[idx]) < 2e-2  # the forward's own output, kept rows


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("packed", [False, True])
def test_checkpointed_model_gradients_match_reference_semantics(name, packed):
    ids, kw = batch(seed=len(name), packed=packed)
    model64 = build_model(CONFIGS[name], dtype=torch.float64, device="cuda", seed=0)
    out = model64(ids, labels=ids, **kw)
    keep = Selector("loss", 0.5)(out.token_loss, out.valid)
    reference_filtered_loss(model64, ids, ids, keep, **kw).backward()
    truth = grads(model64)
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, None)):
        model = build_model(CONFIGS[name], dtype=dtype, device="cuda", seed=0)
        found = {}
        for recompute in (False, True):
            (model.activation_checkpointing_enable if recompute else model.activation_checkpointing_disable)()
            out = model(ids, labels=ids, **kw)
            out.plan.loss(out.token_loss, keep).backward()
            found[recompute] = worst_rel(grads(model), truth)
        # Checkpointed: as close to float64 as the uncheckpointed kernel path (bf16
        # rounding of the recomputed activations may differ, not the semantics).
        limit = tol if tol is not None else 2 * found[False] + 1e-3
        assert found[True] < limit, f"{dtype}: checkpointed {found[True]:.2e}, plain {found[False]:.2e}"


def test_lora_checkpointed_gradients_match_reference_semantics():
    peft = pytest.importorskip("peft")
    ids, kw = batch(seed=3, packed=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def lora_model(dtype):
        model = build_model(CONFIGS["llama-gqa-d64"], dtype=dtype, device="cuda", seed=0)
        torch.manual_seed(1)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        return peft.get_peft_model(model, cfg).get_base_model()

    def adapter_grads(model):
        out = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        model.zero_grad(set_to_none=True)
        return out

    model64 = lora_model(torch.float64)
    out = model64(ids, labels=ids, **kw)
    keep = Selector("loss", 0.5)(out.token_loss, out.valid)
    reference_filtered_loss(model64, ids, ids, keep, **kw).backward()
    truth = adapter_grads(model64)
    model = lora_model(torch.bfloat16)
    reference_filtered_loss(model, ids, ids, keep, **kw).backward()
    plain16 = worst_rel(adapter_grads(model), truth)
    model.activation_checkpointing_enable()
    out = model(ids, labels=ids, **kw)
    out.plan.loss(out.token_loss, keep).backward()
    ours16 = worst_rel(adapter_grads(model), truth)
    assert ours16 < 2 * plain16 + 1e-3, f"bf16 LoRA + checkpointing {ours16:.2e} vs plain bf16 {plain16:.2e}"


def test_lora_dropout_masks_on_cuda():
    """lora_dropout on CUDA: the layer draws its masks from the CUDA default
    generator and repeats the draws from the saved generator state in the
    backward and the recompute. The reference runs peft's modules with their
    dropout drawing by the layer's op (peft's own CUDA dropout is a fused kernel
    with other draws) from the same seed, so both apply the same masks; a
    reference from another seed shows what other masks would change."""
    peft = pytest.importorskip("peft")
    ids, kw = batch(seed=4, packed=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = build_model(CONFIGS["llama-gqa-d64"], dtype=torch.float32, device="cuda", seed=0)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.1,
                          init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(model, cfg).get_base_model()

    def adapter_grads():
        out = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    keep = None
    for recompute in (False, True):
        (model.activation_checkpointing_enable if recompute else model.activation_checkpointing_disable)()
        torch.manual_seed(2)
        out = model(ids, labels=ids, **kw)
        keep = Selector("loss", 0.5)(out.token_loss, out.valid) if keep is None else keep
        out.plan.loss(out.token_loss, keep).backward()
        got = adapter_grads()
        for module in drops:  # peft's dropout, drawn as the layer draws
            module.forward = lambda x, p=module.p: x * x.new_empty(x.shape).bernoulli_(1 - p).div_(1 - p)
        want = {}
        for seed in (2, 3):
            torch.manual_seed(seed)
            reference_filtered_loss(model, ids, ids, keep, **kw).backward()
            want[seed] = adapter_grads()
        for module in drops:
            del module.forward
        same, other = worst_rel(got, want[2]), worst_rel(got, want[3])
        assert same < 5e-3 and other > 10 * same, f"recompute={recompute}: {same:.2e} vs {other:.2e}"
