"""A patched transformers Llama on the GPU kernel path: the fused ``labels=``
forward against the logits form and the float64 truth, and on top of
Liger-Kernel (whose ops Centrifuge's replace in training; Liger's own run in
no-grad calls).

    python -m pytest tests/gpu/test_hf_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")

from centrifuge import filtered_loss, patch  # noqa: E402
from centrifuge.selection import Selector  # noqa: E402


def llama(seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def ids_and_keep(seed=1, B=2, L=301):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, L), generator=g)
    keep = torch.rand(B, L, generator=g) < 0.5
    keep[:, -1] = False  # the last row has no target
    return ids, keep


def fused_grads(model, ids, keep):
    out = model(input_ids=ids, labels=ids)
    filtered_loss(out.token_loss, keep.to(ids.device)).backward()
    return {n: p.grad.double().cpu() for n, p in model.named_parameters()}


def logits_grads(model, ids, keep):
    logits = model(input_ids=ids).logits[:, :-1].float()
    tl = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    filtered_loss(tl, keep[:, :-1].to(ids.device)).backward()
    return {n: p.grad.double().cpu() for n, p in model.named_parameters()}


def worst_rel(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


def test_fused_labels_path_is_as_close_to_float64_as_the_logits_path():
    base = llama()
    ids, keep = ids_and_keep()
    truth = fused_grads(patch(copy.deepcopy(base).double()), ids, keep)  # CPU float64
    gpu = copy.deepcopy(base).to("cuda", torch.bfloat16)
    fused = fused_grads(patch(copy.deepcopy(gpu)), ids.cuda(), keep)
    via_logits = logits_grads(patch(gpu), ids.cuda(), keep)
    assert worst_rel(fused, truth) <= 2 * worst_rel(via_logits, truth) + 1e-3


def test_liger_then_patch_trains_like_patch_and_keeps_liger_for_no_grad():
    liger = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    saved = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    try:
        plain = llama().to("cuda", torch.bfloat16)
        with_liger = copy.deepcopy(plain)
        liger._apply_liger_kernel_to_instance(model=with_liger)
        ids, keep = ids_and_keep()
        ids = ids.cuda()
        with torch.no_grad():
            want_logits = plain(input_ids=ids).logits.float()
        with pytest.warns(UserWarning, match="Liger-Kernel"):
            patch(with_liger)
        want = fused_grads(patch(plain), ids, keep)
        got = fused_grads(with_liger, ids, keep)
        assert worst_rel(got, want) < 1e-2
        with torch.no_grad():  # Liger's forward (its RMSNorm, SwiGLU and RoPE kernels)
            logits = with_liger(input_ids=ids).logits.float()
        torch.testing.assert_close(logits, want_logits, rtol=5e-2, atol=5e-2)
    finally:
        for n, v in saved.items():
            setattr(modeling_llama, n, v)
