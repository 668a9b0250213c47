"""Context rows: real tokens whose label is -100 (a prompt, a system turn).

They carry no loss but stay in the backward set by default, so keeping every
labelled row (ρ = 1) gives exactly plain training's gradient, with completion-only
labels, padding (left and right), packing, activation checkpointing and LoRA, on
the native model and on the four patched transformers families (float64). At
ρ < 1 the gradient is the written reference semantics: K/V detached on the rows
that are neither kept nor context. ``BackwardOptions(context="constant")`` is the
cheaper semantics that treats them as filtered.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from centrifuge import BackwardOptions, Selector, filtered_loss, patch, selective_loss
from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_token_loss
from centrifuge.plan import Layout, context_rows

F64 = torch.float64


def relative_error(got: dict, want: dict) -> float:
    num = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
    return (num / sum(float(w.pow(2).sum()) for w in want.values())) ** 0.5


def assert_same(got: dict, want: dict, tol=1e-9):
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=tol, atol=tol * 1e-2, msg=name)


def sft_batch(kind, vocab, B=3, L=17, seed=0):
    """input_ids, completion-only labels and the model kwargs. Every document
    opens with a prompt of 3-6 tokens labelled -100; padding is labelled -100.
    kind: ``padding`` (row 0 left-padded, row 1 right-padded), ``packing``
    (documents restart position_ids, no attention_mask) or ``plain``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = ids.clone()
    pos = torch.arange(L).repeat(B, 1)
    real = torch.ones(B, L, dtype=torch.bool)
    kw = {}
    if kind == "padding":
        real[0, :4] = False
        real[1, L - 3 :] = False
        kw["attention_mask"] = real.long()
    elif kind == "packing":
        pos[0, 8:] -= 8
        pos[1, 6:] -= 6
        pos[1, 12:] -= 6
        kw["position_ids"] = pos
    labels[~real] = -100
    for b in range(B):
        starts = [t for t in range(L) if real[b, t] and (t == 0 or not real[b, t - 1] or pos[b, t] == 0)]
        for s in starts:
            prompt = int(torch.randint(3, 7, (1,), generator=g))
            labels[b, s : s + prompt] = -100
    return ids, labels, kw


def grads_of(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# --- the native model ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("kind", ["padding", "packing"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_native_keep_all_equals_plain_training(name, kind, checkpointing):
    model = build_model(get_preset(name), dtype=F64, seed=1)
    ids, labels, kw = sft_batch(kind, model.config.vocab_size, seed=2)
    token_loss, valid = reference_token_loss(model, ids, labels, None, **kw)  # plain autograd
    ((token_loss * valid).sum() / valid.sum()).backward()
    want = grads_of(model)
    if checkpointing:
        model.activation_checkpointing_enable()
    for count in (None, int(valid.sum())):  # count: the sync-free plan, compact at ρ = 1
        out = model(ids, labels=labels, backward=BackwardOptions(path="compact"), **kw)
        assert torch.equal(out.valid, valid) and out.plan.context.any()
        out.plan.loss(out.token_loss, out.valid, count).backward()
        assert out.plan.compact == (count is not None)
        assert_same(grads_of(model), want)


@pytest.mark.parametrize("path", ["compact", "dense"])
def test_native_selection_follows_the_reference_in_both_semantics(path):
    model = build_model(get_preset("tiny-gqa"), dtype=F64, seed=3)
    ids, labels, kw = sft_batch("padding", model.config.vocab_size, seed=4)
    results = {}
    for context in ("backward", "constant"):
        opts = BackwardOptions(path=path, context=context)
        out = model(ids, labels=labels, backward=opts, **kw)
        keep = Selector("loss", 0.5)(out.token_loss, out.valid)
        out.plan.loss(out.token_loss, keep).backward()
        got = grads_of(model)
        ref, _ = reference_token_loss(model, ids, labels, keep, context=context, **kw)
        ((ref * keep).sum() / keep.sum()).backward()
        assert_same(got, grads_of(model))
        results[context] = got
    # The two semantics differ (this batch's prompts matter).
    assert relative_error(results["constant"], results["backward"]) > 0.05


def test_context_rows_definition():
    """Rows without a target that precede a labelled row of their document: not
    padding, not a document's last row, not an unlabelled tail."""
    valid = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])  # two documents
    layout = Layout.build(1, 10, position_ids=pos)
    want = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(context_rows(valid, layout), want)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])  # left padding: its own segment
    valid = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    layout = Layout.build(1, 10, attention_mask=mask)
    assert torch.equal(context_rows(valid, layout)[0, :4], torch.tensor([False, False, True, True]))


def test_context_option_is_validated_and_parsed():
    with pytest.raises(ValueError, match="context must be one of"):
        BackwardOptions(context="ignore")
    opts = BackwardOptions.parse("context=constant,exact_layers=1")
    assert opts.context == "constant" and opts.describe() == "amplified+exact1+context-constant"


# --- patched transformers models -----------------------------------------------------

transformers = pytest.importorskip("transformers")

from test_hf_checkpointing import enable_checkpointing  # noqa: E402
from test_hf_patch import FAMILIES, V, exact_copy, make_model, reference_loss  # noqa: E402

from centrifuge.integrations.hf import layout_for, valid_rows  # noqa: E402


def sft_loss(model, ids, labels, kw):
    """Plain SFT: the unpatched model's completion-only cross-entropy, as
    transformers' own loss defines it, computed in float64 (transformers rounds
    the logits to float32 first)."""
    logits = model(ids, use_cache=False, **kw).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])


def plain_sft_grads(model, ids, labels, kw):
    ref = exact_copy(model)
    sft_loss(ref, ids, labels, kw).backward()
    return grads_of(ref)


def backward_rows(labels, keep, kw):
    B, L = labels.shape
    layout = layout_for(B, L, labels.device, kw.get("attention_mask"), kw.get("position_ids"))
    return keep | context_rows(valid_rows(labels, kw.get("attention_mask"), kw.get("position_ids")), layout)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_patched_keep_all_equals_plain_transformers(family, kind):
    model = make_model(family, 2)
    ids, labels, kw = sft_batch(kind, V, seed=5)
    want = plain_sft_grads(model, ids, labels, kw)
    logits_model = patch(copy.deepcopy(model))
    patch(model)
    # The fused form (labels=), with and without a host count (compact at ρ = 1).
    for count in (None, "host"):
        out = model(ids, labels=labels, **kw)
        n = int(out.valid.sum()) if count else None
        filtered_loss(out.token_loss, out.valid, count=n).backward()
        assert_same(grads_of(model), want)
    # The logits form, as the issue tried it: selective_loss with "none" at ρ = 1.
    logits = logits_model(ids, **kw).logits
    selective_loss(logits, labels, "none", 1.0, **kw).backward()
    assert_same(grads_of(logits_model), want)
    # The one-line form from the README: losses from the labels, keep = labelled rows.
    logits = logits_model(ids, **kw).logits
    tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    filtered_loss(tl, labels[:, 1:] != -100).backward()
    assert_same(grads_of(logits_model), want)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_selection_follows_the_reference_and_constant_differs(family):
    model = make_model(family, 2)
    ids, labels, kw = sft_batch("padding", V, seed=6)
    patched = patch(copy.deepcopy(model))
    out = patched(ids, labels=labels, **kw)
    loss, keep = selective_loss(out, labels, "loss", 0.5, return_keep=True)
    loss.backward()
    got = grads_of(patched)
    _, want = reference_loss(model, ids, keep, backward_rows(labels, keep, kw), **kw)
    assert_same(got, {n: want[n] for n in got})

    constant = patch(copy.deepcopy(model), backward=BackwardOptions(context="constant"))
    out = constant(ids, labels=labels, **kw)
    filtered_loss(out.token_loss, keep).backward()
    got_constant = grads_of(constant)
    model.zero_grad(set_to_none=True)
    _, want = reference_loss(model, ids, keep, **kw)  # context rows detached too
    assert_same(got_constant, {n: want[n] for n in got_constant})
    assert relative_error(got_constant, got) > 0.05


def test_patched_keep_all_with_checkpointing_and_lora():
    peft = pytest.importorskip("peft")
    from test_lora import lora

    model = make_model("mistral", 2)
    ids, labels, kw = sft_batch("packing", V, seed=7)
    plain = lora(exact_copy(model))
    sft_loss(plain, ids, labels, kw).backward()
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    patched = patch(lora(copy.deepcopy(model)))
    enable_checkpointing(patched)
    out = patched(ids, labels=labels, **kw)
    filtered_loss(out.token_loss, out.valid, count=int(out.valid.sum())).backward()
    got = {n: p.grad for n, p in patched.named_parameters() if p.requires_grad}
    assert isinstance(patched, peft.PeftModel) and len(got) > 0
    assert_same(got, want)
