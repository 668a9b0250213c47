"""centrifuge.patch on real transformers classes (tiny configs, random weights).

Gradients of a patched model + the one-line loss are held to the reference
semantics (docs/design.md) computed with plain autograd on an unpatched copy of the
same HF model: K and V of filtered rows detached in every attention layer
(forward hooks), the loss averaged over kept rows. In float64, with the copy's
RMSNorms computing in float64 too (HF's own RMSNorm rounds to float32 even for
float64 models) and attention through sdpa (HF's eager float64 path gives NaN
on left-padding rows); fidelity to HF's own code is checked separately in
float32, eager and sdpa.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from centrifuge import Selector, filtered_loss, patch, selective_loss, unpatch  # noqa: E402
from centrifuge.integrations import find_plan, is_patched  # noqa: E402

V = 61
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {"head_dim": 8}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, {}),
}


def make_model(family, kv_heads=2, attn="sdpa", dtype=torch.float64, seed=0, **over):
    cls, config_cls, extra = FAMILIES[family]
    cfg = config_cls(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
        **{"tie_word_embeddings": False, **extra, **over},
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _exact_rms_norm(norm):
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    return forward


def exact_copy(model):
    """An unpatched copy whose RMSNorms keep float64."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = _exact_rms_norm(m)
    return ref


def reference_loss(model, ids, keep_rows, backward_rows=None, **kw):
    """Masked-mean loss of an unpatched copy with K/V of filtered rows detached.
    keep_rows: [B, L] bool (row t predicts t+1); backward_rows: the rows whose
    K/V stay differentiable (default keep_rows; kept + context rows for labels
    with ignored targets)."""
    ref = exact_copy(model)
    live = keep_rows if backward_rows is None else backward_rows

    def detach_filtered(module, args, out):
        k = live.view(*live.shape, *([1] * (out.dim() - 2)))
        return torch.where(k, out, out.detach())

    for layer in ref.model.layers:
        a = layer.self_attn
        (a.k_norm if hasattr(a, "k_norm") else a.k_proj).register_forward_hook(detach_filtered)
        a.v_proj.register_forward_hook(detach_filtered)
    logits = ref(ids, use_cache=False, **kw).logits
    tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = keep_rows[:, :-1]
    loss = torch.where(keep, tl, 0.0).sum() / keep.sum()
    loss.backward()
    return loss, {n: p.grad for n, p in ref.named_parameters()}


def batch(kind, B=3, L=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    kw, real = {}, torch.ones(B, L, dtype=torch.bool)
    if kind == "padding":  # left, right and no padding
        real[0, :4] = False
        real[1, L - 3 :] = False
        kw["attention_mask"] = real.long()
    elif kind == "packing":  # documents restart position_ids; no attention_mask
        pos = torch.arange(L).repeat(B, 1)
        pos[0, 5:] -= 5
        pos[1, 3:] -= 3
        pos[1, 9:] -= 6
        kw["position_ids"] = pos
    keep = (torch.rand(B, L, generator=g) < 0.5) & real
    keep[:, -1] = False
    keep[0, 6] = True
    return ids, kw, keep


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_patched_grads_match_reference_semantics(family, kv_heads, kind):
    model = make_model(family, kv_heads)
    ids, kw, keep = batch(kind, seed=kv_heads)
    want_loss, want = reference_loss(model, ids, keep, **kw)
    patch(model)
    logits = model(ids, **kw).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = filtered_loss(token_loss, keep[:, :-1])  # the one line
    assert find_plan(token_loss).compact
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patched_forward_equals_unpatched_in_float32(family, attn):
    model = make_model(family, 2, attn, dtype=torch.float32)
    plain = copy.deepcopy(model)
    patch(model)
    for kind in ("padding", "packing", "plain"):
        ids, kw, _ = batch(kind, seed=3)
        got = model(ids, **kw)
        want = plain(ids, use_cache=False, **kw).logits
        assert find_plan(got.logits) is not None  # the compact path ran
        real = kw.get("attention_mask", torch.ones_like(ids)).bool()
        # Padding positions are garbage in both (they attend differently).
        torch.testing.assert_close(got.logits[real], want[real], rtol=1e-5, atol=2e-6)
        with torch.no_grad():  # a no-grad call runs HF's own code
            torch.testing.assert_close(model(ids, **kw).logits, plain(ids, **kw).logits)


def test_generation_saving_and_unpatch(tmp_path):
    model = make_model("qwen2", 2, "sdpa", dtype=torch.float32)
    plain = copy.deepcopy(model)
    names = list(model.state_dict())
    patch(model)
    assert is_patched(model) and list(model.state_dict()) == names
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), plain.generate(ids, **gen))
    with torch.enable_grad():  # a cached call under grad also runs HF's code
        out = model(ids, use_cache=True)
        assert out.past_key_values is not None and find_plan(out.logits) is None
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float32)
    for (n, p), (_, q) in zip(plain.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    # Trainer and generate read the forward's signature.
    import inspect

    assert inspect.signature(model.forward) == inspect.signature(plain.forward)
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.model.layers[0].__dict__
    assert find_plan(model(ids).logits) is None
    # A deep copy of a patched model is patched on its own modules.
    copied = copy.deepcopy(patch(model))
    assert copied.forward.module is copied and find_plan(copied(ids).logits) is not None


def test_unfilled_plan_is_dense_training_and_accumulation_keeps_plans_apart():
    model = make_model("llama", 2)
    plain = exact_copy(model)
    patch(model)
    ids, kw, keep = batch("packing", B=2, L=9, seed=1)
    # `.loss` of a patched model given labels (the fused path): no filtering,
    # ordinary gradients. Labels as DataCollatorWithFlattening writes them
    # (-100 on each document's first token), so HF's loss skips the rows that
    # cross documents, as Centrifuge's valid rows do. HF's loss rounds float64
    # logits to float32, so the plain loss is HF's formula in float64.
    labels = ids.masked_fill(kw["position_ids"] == 0, -100)
    model(ids, labels=labels, **kw).loss.backward()
    lg = plain(ids, use_cache=False, **kw).logits
    F.cross_entropy(lg[:, :-1].transpose(1, 2), labels[:, 1:]).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    # Two forwards, two keep masks, one backward: each forward uses its own plan.
    model.zero_grad()
    ids2, kw2, keep2 = batch("packing", B=2, L=9, seed=2)
    losses = []
    for i, k, a in ((ids, keep, kw), (ids2, keep2, kw2)):
        lg = model(i, **a).logits
        tl = F.cross_entropy(lg[:, :-1].transpose(1, 2), i[:, 1:], reduction="none")
        losses.append(filtered_loss(tl, k[:, :-1]))
    (losses[0] + losses[1]).backward()
    _, g1 = reference_loss(plain, ids, keep, **kw)
    _, g2 = reference_loss(plain, ids2, keep2, **kw2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g1[n] + g2[n], rtol=1e-9, atol=1e-11, msg=n)


def test_plan_lives_only_as_long_as_the_graph():
    model = patch(make_model("mistral", 2))
    ids = torch.randint(0, V, (2, 7))
    logits = model(ids).logits
    ref = weakref.ref(find_plan(logits))
    del logits
    gc.collect()
    assert ref() is None
    assert model.forward.state.plan is None


def test_selective_loss_selects_and_matches_reference():
    model = make_model("qwen3", 2)
    ids, kw, _ = batch("padding", seed=5)
    ref_logits = torch.randn(*ids.shape, V, dtype=torch.float64)
    patch(model)
    logits = model(ids, **kw).logits
    sel = Selector("rho1", 0.4)
    loss, keep = selective_loss(
        logits, ids, sel, reference_logits=ref_logits, attention_mask=kw["attention_mask"],
        return_keep=True,
    )  # fmt: skip
    # The selection: rho1 scores over valid rows (real, with a next real token).
    real = kw["attention_mask"].bool()
    valid = real.clone()
    valid[:, :-1] &= real[:, 1:]
    valid[:, -1] = False
    tl = F.cross_entropy(logits.detach()[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    rl = F.cross_entropy(ref_logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    pad = torch.zeros(ids.shape[0], 1, dtype=tl.dtype)
    expect_keep = sel(torch.cat([tl, pad], 1), valid, torch.cat([rl, pad], 1))
    assert torch.equal(keep, expect_keep) and int(keep.sum()) == -(-int(valid.sum()) * 4 // 10)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want_loss, want = reference_loss(unpatch(model), ids, keep, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_selective_loss_random_by_name_draws_anew_every_call():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, V, generator=g)
    labels = torch.randint(0, V, (2, 40), generator=g)

    def masks(n=3, **kw):
        return [selective_loss(logits, labels, "random", 0.5, return_keep=True, **kw)[1]
                for _ in range(n)]  # fmt: skip

    torch.manual_seed(1)
    first = masks()
    assert all(not torch.equal(a, b) for i, a in enumerate(first) for b in first[i + 1 :])
    torch.manual_seed(1)
    assert all(map(torch.equal, first, masks()))
    # generator=: the sequence of a Selector seeded alike, whatever torch's seed.
    sel = Selector("random", 0.5, seed=5)
    want = [selective_loss(logits, labels, sel, return_keep=True)[1] for _ in range(3)]
    got = masks(generator=torch.Generator().manual_seed(5))
    assert all(map(torch.equal, want, got))
    with pytest.raises(ValueError, match="generator= goes with a method name"):
        selective_loss(logits, labels, sel, generator=torch.Generator())


def test_clear_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V))
    with pytest.raises(TypeError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        patch(gpt2)
    model = patch(make_model("mistral", 2, sliding_window=6))
    ids = torch.randint(0, V, (2, 9))
    with pytest.raises(ValueError, match="sliding window"):
        model(ids)
    model = patch(make_model("llama", 2))
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="holes"):
        model(ids, attention_mask=holes)
    pad = torch.ones_like(ids)
    pad[:, :2] = 0
    tl = F.cross_entropy(model(ids, attention_mask=pad).logits.transpose(1, 2), ids, reduction="none")
    with pytest.raises(ValueError, match="padding"):
        filtered_loss(tl, torch.ones_like(tl, dtype=torch.bool))
    # Losses misaligned with the logits (shifted the wrong way): caught in the backward.
    logits = model(ids).logits
    tl = F.cross_entropy(logits[:, 1:].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = torch.zeros_like(tl, dtype=torch.bool)
    keep[:, ::2] = True
    with pytest.raises(RuntimeError, match="filtered rows"):
        filtered_loss(tl, keep).backward()
    # One loss over two forwards.
    a, b = model(ids).logits, model(ids).logits
    tl = F.cross_entropy(torch.cat([a, b]).transpose(1, 2), torch.cat([ids, ids]), reduction="none")
    with pytest.raises(ValueError, match="several forward"):
        filtered_loss(tl, torch.ones_like(tl, dtype=torch.bool))


def test_autocast_bf16_grads_close_to_float32_reference():
    model = make_model("qwen2", 2, dtype=torch.float32)
    ids, kw, keep = batch("padding", seed=7)
    _, want = reference_loss(model.double(), ids, keep, **kw)
    patch(model.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, **kw).logits
        assert logits.dtype == torch.bfloat16
        tl = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        loss = filtered_loss(tl, keep[:, :-1])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        err = (p.grad.double() - want[name]).norm() / want[name].norm()
        assert err < 0.05, (name, float(err))


def test_tied_embeddings():
    model = make_model("qwen2", 2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, kw, keep = batch("packing", seed=11)
    want_loss, want = reference_loss(model, ids, keep, **kw)
    patch(model)
    logits = model(ids, **kw).logits
    tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    filtered_loss(tl, keep[:, :-1]).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-11, msg=name)
