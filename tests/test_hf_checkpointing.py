"""centrifuge.patch with transformers' activation checkpointing on: gradients equal
the reference semantics and the uncheckpointed patched model, in float64 on real
transformers classes; the recompute runs on kept rows."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_patch import batch, exact_copy, make_model, reference_loss  # noqa: E402

from centrifuge import filtered_loss, patch  # noqa: E402
from centrifuge.models import layer as layer_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def enable_checkpointing(model, **kw):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kw)
    model.train()
    return model


def patched_grads(model, ids, kw, keep):
    logits = model(ids, **kw).logits
    tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = filtered_loss(tl, keep[:, :-1])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture
def recomputed(monkeypatch):
    """Rows of every kept-query attention recompute (one entry per layer backward)."""
    rows = []
    original = layer_mod.attention_forward_rows

    def spy(q, k, v, lse, layout, idx):
        rows.append(idx.numel())
        return original(q, k, v, lse, layout, idx)

    monkeypatch.setattr(layer_mod, "attention_forward_rows", spy)
    return rows


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_checkpointed_patched_grads_match_reference(family, kind, recomputed):
    model = make_model(family, 2)
    ids, kw, keep = batch(kind, seed=4)
    want_loss, want = reference_loss(model, ids, keep, **kw)
    patch(model)
    plain_loss, plain = patched_grads(model, ids, kw, keep)
    assert recomputed == []
    enable_checkpointing(model)
    loss, got = patched_grads(model, ids, kw, keep)
    assert recomputed == [int(keep.sum())] * len(model.model.layers)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)
        torch.testing.assert_close(g, plain[name], rtol=1e-11, atol=1e-13, msg=name)


@pytest.fixture
def layer_call_checkpoints(monkeypatch):
    """transformers <= 5.17 checkpoints inside GradientCheckpointingLayer.__call__,
    around the (patched) forward; later versions elsewhere. Emulate the former."""
    from functools import partial

    from transformers.modeling_layers import GradientCheckpointingLayer

    def call(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(partial(torch.nn.Module.__call__, self, **kwargs), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call)


def test_checkpointing_in_the_layer_call_is_replaced_too(recomputed, layer_call_checkpoints):
    test_checkpointed_patched_grads_match_reference("llama", "padding", recomputed)


def test_every_n_layers_and_dense_training_under_checkpointing(recomputed):
    model = make_model("mistral", 2)
    plain = exact_copy(model)
    ids, kw, keep = batch("packing", seed=6)
    patch(model)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or "every_n_layers" not in enable.__code__.co_varnames:
        pytest.skip("this transformers has no every_n_layers")
    enable_checkpointing(model, every_n_layers=2)  # layer 0 of 2
    _, got = patched_grads(model, ids, kw, keep)
    assert len(recomputed) == 1
    _, want = reference_loss(plain, ids, keep, **kw)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)
    # `.loss` with labels (no filtering): dense training, recomputed on every row.
    # Labels skip the rows that cross documents; HF's formula in float64.
    recomputed.clear()
    labels = ids.masked_fill(kw["position_ids"] == 0, -100)
    model(ids, labels=labels, **kw).loss.backward()
    plain.zero_grad(set_to_none=True)
    plain.train()
    lg = plain(ids, use_cache=False, **kw).logits
    F.cross_entropy(lg[:, :-1].transpose(1, 2), labels[:, 1:]).backward()
    assert recomputed == []
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_offloading_checkpoint_function_is_refused():
    model = patch(make_model("llama", 2))
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or "offload" not in enable.__code__.co_varnames:
        pytest.skip("this transformers has no offload option")
    enable_checkpointing(model, offload=True)
    with pytest.raises(NotImplementedError, match="offload"):
        model(torch.randint(0, 61, (2, 7)))
