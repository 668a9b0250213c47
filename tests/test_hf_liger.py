"""centrifuge.patch on a model Liger-Kernel already patched: Centrifuge's ops
replace Liger's in training forwards (with a warning that says so), Liger's stay
for every other call, and unpatch gives Liger's back.

On CPU Liger's Triton kernels cannot run, so a training step that reached any of
them would fail: matching the plain patched model's gradients here also shows
that none was called. tests/gpu/test_hf_liger_gpu.py runs Liger's own forward.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
liger = pytest.importorskip("liger_kernel.transformers")

from test_hf_fused_loss import grads, labelled  # noqa: E402
from test_hf_patch import make_model  # noqa: E402

from centrifuge import filtered_loss, patch, unpatch  # noqa: E402


@pytest.fixture
def liger_llama(monkeypatch):
    """A function applying Liger to a Llama instance; Liger also rewrites
    transformers' llama module (RoPE, norm and MLP classes), restored afterwards."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    return lambda model: liger._apply_liger_kernel_to_instance(model=model)


def step(model, ids, labels, kw, keep):
    out = model(ids, labels=labels, **kw)
    filtered_loss(out.token_loss, keep).backward()
    return out.loss.detach(), grads(model)


@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_patch_replaces_liger_ops_in_training_with_a_warning(liger_llama, kind):
    model = make_model("llama", 2)
    liger_model = copy.deepcopy(model)
    liger_llama(liger_model)
    ids, labels, kw, keep = labelled(kind, seed=2)

    want_loss, want = step(patch(model), ids, labels, kw, keep)
    with pytest.warns(UserWarning, match="Liger-Kernel ops .*LigerRMSNorm.*replace them"):
        patch(liger_model)
    got_loss, got = step(liger_model, ids, labels, kw, keep)
    assert got_loss == want_loss
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_unpatch_restores_liger_forwards(liger_llama):
    model = make_model("llama", 2)
    liger_llama(model)
    before = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    with pytest.warns(UserWarning, match="Liger-Kernel"):
        patch(model)
    # Calls that leave the compact path run Liger's forward (the fused-loss causal LM).
    assert model.forward.original == before[""]
    unpatch(model)
    after = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    assert after == before
    assert "lce_forward" in model.forward.__func__.__name__


def test_gemma_style_norm_offset_is_refused():
    model = make_model("llama", 1)
    model.model.layers[0].input_layernorm.offset = 1.0  # what Liger's Gemma norm carries
    with pytest.raises(ValueError, match="weight offset"):
        patch(model)
