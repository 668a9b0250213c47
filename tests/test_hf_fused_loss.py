"""A patched model called with ``labels=``: final norm + LM head + cross-entropy fused.

Held to (float64, tiny real transformers configs): the unpatched model's
per-token cross-entropy, the reference semantics of tests/test_hf_patch.py, and
the logits path (a patched forward without labels + the one-line loss).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_patch import V, batch, exact_copy, make_model, reference_loss  # noqa: E402

from centrifuge import filtered_loss, patch, selective_loss  # noqa: E402
from centrifuge.integrations import find_plan, valid_rows  # noqa: E402
from centrifuge.integrations.hf import layout_for  # noqa: E402
from centrifuge.plan import BackwardOptions, context_rows  # noqa: E402


def labelled(kind, seed=0, B=3, L=13):
    """A batch with HF-style labels: -100 on padding and on each packed
    document's first token (as DataCollatorWithFlattening writes them), and
    the keep mask restricted to rows that have a target."""
    ids, kw, keep = batch(kind, B=B, L=L, seed=seed)
    labels = ids.clone()
    if "attention_mask" in kw:
        labels[kw["attention_mask"] == 0] = -100
    if "position_ids" in kw:
        labels[kw["position_ids"] == 0] = -100
    labels[0, 2] = -100  # an ignored target inside a document: row 1 is a context row
    valid = valid_rows(labels, kw.get("attention_mask"), kw.get("position_ids"))
    return ids, labels, kw, keep & valid


def backward_rows(labels, keep, kw):
    """Kept + context rows (no target, before a labelled row): the rows whose K/V
    get gradient in the reference semantics."""
    B, L = labels.shape
    layout = layout_for(B, L, labels.device, kw.get("attention_mask"), kw.get("position_ids"))
    valid = valid_rows(labels, kw.get("attention_mask"), kw.get("position_ids"))
    return keep | context_rows(valid, layout)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_token_loss_and_gradients_match_reference_and_logits_path(family, kind):
    model = make_model(family, 2)
    logits_model = patch(copy.deepcopy(model))
    ids, labels, kw, keep = labelled(kind, seed=1)
    want_loss, want = reference_loss(model, ids, keep, backward_rows(labels, keep, kw), **kw)
    plain_logits = exact_copy(model)(ids, use_cache=False, **kw).logits.detach()
    patch(model)

    out = model(ids, labels=labels, **kw)
    assert out.logits is None
    valid = valid_rows(labels, kw.get("attention_mask"), kw.get("position_ids"))
    assert torch.equal(out.valid, valid)
    ce = F.cross_entropy(plain_logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    want_tl = torch.where(valid[:, :-1], ce, 0.0)
    assert out.token_loss.dtype == torch.float64
    torch.testing.assert_close(out.token_loss[:, :-1], want_tl, rtol=1e-12, atol=1e-12)
    assert not out.token_loss[:, -1].any()
    torch.testing.assert_close(out.loss, ce[valid[:, :-1]].mean(), rtol=1e-12, atol=1e-12)

    loss = filtered_loss(out.token_loss, keep)
    assert find_plan(out.token_loss).compact  # filtered_loss found and filled the plan
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    got = grads(model)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)

    lg = logits_model(ids, **kw).logits
    tl = F.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    filtered_loss(tl, keep[:, :-1], valid=valid[:, :-1]).backward()
    for name, g in grads(logits_model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "opts", [dict(extra=0.5, seed=3), dict(exact_layers=1)], ids=["extra", "exact_layers"]
)
def test_tied_embeddings_knobs_and_checkpointing_match_logits_path(opts):
    model = make_model("qwen2", 2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    other = copy.deepcopy(model)
    ids, labels, kw, keep = labelled("padding", seed=2)
    for m in (model, other):
        patch(m, backward=BackwardOptions(**opts))
        m.gradient_checkpointing_enable()
    out = model(ids, labels=labels, **kw)
    filtered_loss(out.token_loss, keep).backward()
    lg = other(ids, **kw).logits
    tl = F.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    valid = valid_rows(labels, kw.get("attention_mask"))
    filtered_loss(tl, keep[:, :-1], valid=valid[:, :-1]).backward()
    want = grads(other)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_num_items_and_the_calls_that_run_transformers_code():
    model = patch(make_model("llama", 2))
    ids, labels, kw, _ = labelled("padding")
    out = model(ids, labels=labels, num_items_in_batch=7, **kw)
    torch.testing.assert_close(out.loss, out.token_loss.sum() / 7)
    with torch.no_grad():  # no grad: transformers' forward, logits and its own loss
        plain = model(ids, labels=labels, **kw)
    assert plain.logits.shape == (*ids.shape, V) and plain.loss is not None
    # The hidden states asked for: transformers' loss on the (compact) logits.
    hidden = model(ids, labels=labels, output_hidden_states=True, **kw)
    assert hidden.logits is not None and hidden.hidden_states is not None
    with pytest.raises(ValueError, match="labels must be"):
        model(ids, labels=labels[:, 1:], **kw)


def test_gradient_into_filtered_rows_raises():
    model = patch(make_model("llama", 2))
    ids, labels, kw, keep = labelled("packing")
    out = model(ids, labels=labels, **kw)
    loss = filtered_loss(out.token_loss, keep) + out.loss  # out.loss reaches filtered rows
    with pytest.raises(RuntimeError, match="gradient to filtered rows"):
        loss.backward()


@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_a_host_count_makes_selection_and_checks_sync_free(kind):
    """With the kept count known beforehand (from the CPU labels), the selection,
    the plan and the padding and stray-gradient checks never wait for the device;
    the gradients are those of the synchronous path."""
    from test_plan_selection import _syncs

    from centrifuge.selection import Selector

    model = patch(make_model("llama", 2))
    ids, labels, kw, _ = labelled(kind, seed=3)
    selector = Selector("loss", 0.5)
    count = selector.count(valid_rows(labels, kw.get("attention_mask"), kw.get("position_ids")))

    def step(count):
        out = model(ids, labels=labels, **kw)
        step.loss = selective_loss(out, labels, selector, count=count)
        step.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = step(None)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kw)
    assert _syncs(lambda: selective_loss(out, labels, selector, count=count).backward()) == []
    model.zero_grad(set_to_none=True)
    got = step(count)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)
    out = model(ids, labels=labels, **kw)  # the checks still hold, as device asserts
    loss = selective_loss(out, labels, selector, count=count) + out.loss
    with pytest.raises(RuntimeError, match="gradient to filtered rows"):
        loss.backward()
    out = model(ids, labels=labels, **kw)
    keep = selector(out.token_loss, out.valid)
    with pytest.raises(RuntimeError, match="kept count disagree"):
        filtered_loss(out.token_loss, keep, count=count + 1)


def _largest_saved(fn, model) -> int:
    """The most elements of any tensor autograd saves while ``fn`` runs, not
    counting the model's own parameters (saved by reference, no memory)."""
    params = {p.data_ptr() for p in model.parameters()}
    sizes = [0]

    def pack(t):
        if t.data_ptr() not in params:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_no_rows_by_vocab_tensor_is_saved_for_backward():
    vocab = 300
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = patch(transformers.LlamaForCausalLM(cfg).double())
    ids, labels, kw, _ = labelled("padding", B=4, L=16)
    rows_by_vocab = ids.shape[0] * (ids.shape[1] - 1) * vocab  # logits[:, :-1]

    def logits_path():
        lg = model(ids, **kw).logits
        F.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")

    assert _largest_saved(logits_path, model) >= rows_by_vocab  # the count sees logits
    assert _largest_saved(lambda: model(ids, labels=labels, **kw), model) < rows_by_vocab // 4


def test_selective_loss_on_a_fused_output_equals_the_logits_path():
    model = make_model("qwen3", 2)
    other = patch(copy.deepcopy(model))
    patch(model)
    ids, labels, kw, _ = labelled("packing", seed=4)
    ref = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, keep = selective_loss(model(ids, labels=labels, **kw), labels, "rho1", 0.5,
                                reference_loss=ref, return_keep=True)  # fmt: skip
    loss2, keep2 = selective_loss(other(ids, **kw).logits, labels, "rho1", 0.5, reference_loss=ref,
                                  return_keep=True, **kw)  # fmt: skip
    assert torch.equal(keep, keep2) and keep.any()
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=1e-12)
    loss.backward()
    loss2.backward()
    want = grads(other)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_peft_lora_model_takes_the_fused_path():
    peft = pytest.importorskip("peft")
    from test_lora import lora, trainable_grads

    base = make_model("llama", 2)
    models = [patch(lora(copy.deepcopy(base))) for _ in range(2)]
    ids, labels, kw, keep = labelled("packing", seed=5)
    out = models[0](ids, labels=labels, **kw)
    assert isinstance(models[0], peft.PeftModel) and out.logits is None
    filtered_loss(out.token_loss, keep).backward()
    lg = models[1](ids, **kw).logits
    # Losses from the labels: the ignored targets' rows are 0, which filtered_loss
    # reads as "no target" (context rows) without being told.
    tl = F.cross_entropy(lg[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    filtered_loss(tl, keep[:, :-1]).backward()
    got, want = trainable_grads(models[0]), trainable_grads(models[1])
    assert got and got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)
