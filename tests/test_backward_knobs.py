"""The quality knobs of the amplified backward (``BackwardOptions``): sampled
filtered rows with reweighted K/V gradients (``extra``, ``extra_weight``), the
exact backward in the bottom or top layers (``exact_layers``, ``exact_top``) and
filtered rows' K/V gradients for the K/V projections (``kv_projections``). Fast
path against the reference semantics in float64; the unbiased estimator against
the exact masked-loss gradient by averaging many samples."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import centrifuge.ops.attention as attn
from centrifuge.models import ModelConfig, build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss
from centrifuge.ops.attention import (
    attention_backward,
    attention_backward_key_rows,
    attention_forward_reference,
    attention_reference,
)
from centrifuge.plan import BackwardOptions, ExtraRows, Layout, Plan, _key_rows, context_rows, precedes
from centrifuge.selection import Selector
from test_model_grads import assert_close, grads, make_batch
from test_ops import _layout, _qkv
from test_plan_selection import _syncs

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64

KNOBS = {
    "extra0.3": dict(extra=0.3),
    "extra0.5-damped": dict(extra=0.5, extra_weight=1.4),
    "exact1": dict(exact_layers=1),
    "extra0.4+exact1": dict(extra=0.4, exact_layers=1),
}


def knob_grads(model, ids, labels, opts, ratio=0.4, **kw):
    """Fast-path gradients with ``opts`` and the reference semantics' gradients
    for the same keep mask and the same sampled rows."""
    out = model(ids, labels=labels, backward=opts, **kw)
    keep = Selector("loss", ratio)(out.token_loss, out.valid)
    out.plan.loss(out.token_loss, keep).backward()
    ours = grads(model)
    reference_filtered_loss(model, ids, labels, keep, **out.plan.reference_knobs(keep), **kw).backward()
    return out.plan, keep, ours, grads(model)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_knobs_match_reference(name, knob):
    model = build_model(get_preset(name), dtype=F64, seed=1)
    ids, labels, kw = make_batch(seed=len(name) + len(knob), packed=True, padded=True)
    opts = BackwardOptions(seed=7, **KNOBS[knob])
    plan, keep, ours, ref = knob_grads(model, ids, labels, opts, **kw)
    assert plan.compact
    if opts.extra:
        assert plan.sampled.any() and not (plan.sampled & keep).any()
    assert_close(ours, ref)


def test_knobs_change_the_gradient_and_extremes_are_exact():
    """The knobs are not amplified in disguise; p = 1 (every filtered row, weight
    1) and exact_layers = all layers give the exact masked-loss gradient."""
    model = build_model(get_preset("tiny-gqa"), dtype=F64, seed=2)
    ids, labels, kw = make_batch(seed=5, packed=True)
    sel = Selector("random", 0.4, seed=1)
    keep = sel(*reference_token_loss(model, ids, labels, **kw))
    token_loss, _ = reference_token_loss(model, ids, labels, None, **kw)
    ((token_loss * keep).sum() / keep.sum()).backward()
    exact = grads(model)
    reference_filtered_loss(model, ids, labels, keep, **kw).backward()
    amplified = grads(model)
    name = "model.layers.0.self_attn.k_proj.weight"
    for opts, same in [(dict(extra=1.0), True), (dict(exact_layers=2), True),
                       (dict(extra=0.5), False), (dict(exact_layers=1), False)]:  # fmt: skip
        out = model(ids, labels=labels, backward=BackwardOptions(**opts), **kw)
        out.plan.loss(out.token_loss, keep).backward()
        ours = grads(model)
        if same:
            assert_close(ours, exact)
        else:
            for other in (exact, amplified):
                assert (ours[name] - other[name]).abs().max() > 1e-3 * other[name].abs().max()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
def test_attention_backward_extra_rows(seed, H, Hkv):
    """Op level: kept + sampled rows with weight w against autograd of the
    weighted reference (other queries' K/V gradient x w, the diagonal x 1)."""
    g = torch.Generator().manual_seed(seed)
    B, L, D = 2, 17, 8
    layout = _layout(B, L, True, g)
    q, k, v = _qkv(B, L, H, Hkv, D, g)
    u = torch.rand(B, L, generator=g)
    keep, sampled = u < 0.3, (u >= 0.3) & (u < 0.6)
    w = 2.5
    weight = keep.to(F64).masked_fill(sampled, w)
    o_ref = attention_reference(q, k, v, layout.segment_ids, weight)
    o, lse = attention_forward_reference(q.detach(), k.detach(), v.detach(), layout)
    assert (o - o_ref).abs().max() < 1e-13  # the weights change no value
    idx = torch.nonzero((keep | sampled).reshape(-1)).squeeze(1)
    do = torch.randn(idx.numel(), H, D, generator=g, dtype=F64)
    o_ref.backward(torch.zeros(B * L, H, D, dtype=F64).index_copy_(0, idx, do).view(B, L, H, D))
    pos = torch.nonzero(sampled.reshape(-1)[idx]).squeeze(1)
    args = (q.detach(), k.detach(), v.detach(), o, lse, do, layout, idx)
    dq, dk, dv = attention_backward(*args, extra=ExtraRows(pos, w))
    for ours, ref in ((dq, q), (dk, k), (dv, v)):
        torch.testing.assert_close(ours, ref.grad.reshape(B * L, -1, D)[idx], rtol=1e-12, atol=1e-12)
    _, dk_plain, _ = attention_backward(*args)
    assert (dk - dk_plain)[pos].abs().max() > 1e-3  # the sampled rows were reweighted


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
def test_attention_backward_key_rows(kernels, H, Hkv, monkeypatch):
    """Op level: the backward rows' dQ, dK, dV and the key rows' dK, dV from the
    backward rows' queries only, against autograd with the key rows' K/V live and
    no output gradient on their queries; with sampled rows among the backward rows.
    ``triton``: the CUDA dispatch (the Triton kernels, run by the interpreter on
    CPU, float32)."""
    if kernels == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(attn, "_gpu_kernels_available", lambda x: True)
    dtype, tol = (F64, 1e-12) if kernels == "reference" else (torch.float32, 2e-5)
    g = torch.Generator().manual_seed(H)
    B, L, D = 2, 17, 8
    layout = _layout(B, L, True, g)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _qkv(B, L, H, Hkv, D, g))
    u = torch.rand(B, L, generator=g)
    keep, sampled = u < 0.3, (u >= 0.3) & (u < 0.45)
    rows = keep | sampled
    key = ~rows & precedes(rows, layout)
    w = 2.0
    weight = keep.to(dtype).masked_fill(sampled, w).masked_fill(key, 1.0)
    o_ref = attention_reference(q, k, v, layout.segment_ids, weight)
    idx = torch.nonzero(rows.reshape(-1)).squeeze(1)
    do = torch.randn(idx.numel(), H, D, generator=g, dtype=F64).to(dtype)
    o_ref.backward(torch.zeros(B * L, H, D, dtype=dtype).index_copy_(0, idx, do).view(B, L, H, D))
    o, lse = attention_forward_reference(q.detach(), k.detach(), v.detach(), layout)
    key_rows = _key_rows(rows, idx)
    extra = ExtraRows(torch.nonzero(sampled.reshape(-1)[idx]).squeeze(1), w)
    dq, dk, dv, dk_key, dv_key = attention_backward_key_rows(
        q.detach(), k.detach(), v.detach(), o, lse, do, layout, idx, key_rows, extra=extra
    )  # fmt: skip
    for ours, ref, at in ((dq, q, idx), (dk, k, idx), (dv, v, idx), (dk_key, k, key_rows.idx),
                          (dv_key, v, key_rows.idx)):  # fmt: skip
        torch.testing.assert_close(ours, ref.grad.reshape(B * L, -1, D)[at], rtol=tol, atol=tol)
    assert dk_key.abs().max() > 1e-3


def test_extra_rows_estimator_is_unbiased_and_the_diagonal_matters(monkeypatch):
    """Average the estimator (p = 0.5, weight 1/p) over many samples on a 3-layer
    float64 model: it converges to the exact masked-loss gradient, its error
    falling like 1/sqrt(samples). Scaling the diagonal by 1/p too (own-query
    terms dropped from the correction) stays biased. Each batch row is one
    independent sample of the same sequence, so a batch of n copies averages n
    samples in one backward (every copy keeps the same rows)."""
    cfg = ModelConfig(64, 16, 32, 3, 2, 1, max_position_embeddings=64)
    model = build_model(cfg, dtype=F64, seed=0)
    with torch.no_grad():  # larger weights than the init: attention far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    L, n, groups = 12, 100, 16
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(1))
    keep = torch.zeros(1, L, dtype=torch.bool)
    keep[0, [3, 6, 9, 10]] = True

    def flat(m):
        return torch.cat([g.reshape(-1) for g in grads(m).values()])

    token_loss, _ = reference_token_loss(model, ids, ids, None)
    ((token_loss * keep).sum() / keep.sum()).backward()
    exact = flat(model)
    reference_filtered_loss(model, ids, ids, keep).backward()
    amplified_err = (flat(model) - exact).norm()

    def errors(opts):
        """(RMS error of one group of n samples, error of the mean of all groups)."""
        means = []
        for _ in range(groups):
            out = model(ids.expand(n, L), labels=ids.expand(n, L), backward=opts)
            out.plan.loss(out.token_loss, keep.expand(n, L)).backward()
            means.append(flat(model))
        means = torch.stack(means)
        single = (means - exact).norm(dim=1).pow(2).mean().sqrt()
        return single / exact.norm(), (means.mean(0) - exact).norm() / exact.norm()

    single, pooled = errors(BackwardOptions(extra=0.5, seed=3))
    # 16x the samples: expected ratio 1/4; the bias, if any, would not shrink.
    assert pooled < 0.45 * single, (single, pooled)
    assert pooled < 0.05 * amplified_err / exact.norm()

    def diagonal_not_corrected(q, k, v, o, lse, do, rows, scale=None):
        zero = torch.zeros(rows.numel(), k.shape[2], k.shape[3], dtype=F64)
        return zero, zero

    monkeypatch.setattr(attn, "own_key_grads", diagonal_not_corrected)
    b_single, b_pooled = errors(BackwardOptions(extra=0.5, seed=3))
    assert b_pooled > 0.8 * b_single and b_pooled > 5 * pooled, (b_single, b_pooled)


def test_sampling_is_seeded_and_only_draws_rows_that_matter():
    model = build_model(get_preset("tiny"), dtype=F64, seed=0)
    ids, labels, kw = make_batch(seed=3, B=4, L=40, packed=True, padded=True)
    keep = None
    draws = []
    for seed in (5, 5):
        opts = BackwardOptions(extra=0.5, seed=seed)
        for _ in range(2):
            out = model(ids, labels=labels, backward=opts, **kw)
            if keep is None:
                keep = Selector("random", 0.3, seed=0)(out.token_loss, out.valid)
            out.plan.set_keep(keep)
            draws.append(out.plan.sampled)
    assert torch.equal(draws[0], draws[2]) and torch.equal(draws[1], draws[3])
    assert not torch.equal(draws[0], draws[1])  # the generator advances
    plan = out.plan
    backward_rows = keep | plan.context  # kept + context rows
    matter = plan._filtered_rows_that_matter(keep, backward_rows)
    for s in draws:
        assert not (s & ~matter).any()
    rate = sum(int(s.sum()) for s in draws) / (len(draws) * int(matter.sum()))
    assert 0.35 < rate < 0.65
    # Rows of the backward set: kept + context + sampled; the LM head still sees the kept rows.
    rows = backward_rows | plan.sampled
    assert torch.equal(plan.rows_idx, torch.nonzero(rows.reshape(-1)).squeeze(1))
    assert plan.n_keep == int(keep.sum()) and plan.keep_idx.numel() == plan.n_keep
    rows, extra = plan.rows_for(0)
    assert torch.equal(plan.rows_idx[extra.pos], torch.nonzero(plan.sampled.reshape(-1)).squeeze(1))


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="extra"):
        BackwardOptions(extra=1.5)
    with pytest.raises(ValueError, match=r"\[1, 1/p\]"):
        BackwardOptions(extra=0.5, extra_weight=3.0)
    with pytest.raises(ValueError, match="needs extra > 0"):
        BackwardOptions(extra_weight=2.0)
    with pytest.raises(ValueError, match="exact_layers"):
        BackwardOptions(exact_layers=-1)
    with pytest.raises(ValueError, match="mode 'exact'"):
        BackwardOptions("exact", extra=0.2)
    with pytest.raises(ValueError, match="exact_top must be a non-negative integer"):
        BackwardOptions(exact_top=1.5)
    with pytest.raises(ValueError, match="kv_projections must be True or False"):
        BackwardOptions(kv_projections="yes")
    for knob in (dict(exact_top=1), dict(kv_projections=True)):
        with pytest.raises(ValueError, match="mode 'exact'"):
            BackwardOptions("exact", **knob)
    model = build_model(get_preset("tiny"), dtype=F64)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        model(ids, labels=ids, backward=BackwardOptions(exact_layers=3))
    with pytest.raises(ValueError, match="exact_top=3 exceeds the model's 2 layers"):
        model(ids, labels=ids, backward=BackwardOptions(exact_top=3))
    with pytest.raises(ValueError, match="overlap in the model's 2 layers"):
        model(ids, labels=ids, backward=BackwardOptions(exact_layers=1, exact_top=2))
    with pytest.raises(ValueError, match="needs the model's num_layers"):
        Plan(Layout.build(1, 5), BackwardOptions(exact_top=1))


def test_parse_and_describe_the_new_knobs():
    opts = BackwardOptions.parse("exact_top=2,kv_projections=1,path=dense")
    assert (opts.exact_top, opts.kv_projections, opts.path) == (2, True, "dense")
    assert opts.describe() == "amplified+exacttop2+kvproj+dense"
    assert BackwardOptions.parse("kv_projections=false").kv_projections is False
    with pytest.raises(ValueError, match="'kv_projections=maybe'.*not a valid kv_projections"):
        BackwardOptions.parse("kv_projections=maybe")
    with pytest.raises(ValueError, match="exact_top=K, kv_projections=0|1"):
        BackwardOptions.parse("exact_bottom=1")
    every = BackwardOptions.parse("exact_top=1,kv_projections=1,backward_ratio=0.7")
    assert every.describe() == "amplified+exacttop1+kvproj+backward0.7"
    assert "exact_top=1, kv_projections=True" in repr(every) and "backward_ratio=0.7" in repr(every)


@pytest.mark.parametrize("opts", [dict(extra=0.4, exact_layers=1, seed=3),
                                  dict(extra=0.4, exact_top=1, kv_projections=True, seed=3)])  # fmt: skip
def test_hf_patched_knobs_match_native_reference(tmp_path, opts):
    """A patched transformers Llama with sampled rows and an exact bottom layer
    (or an exact top layer and kv_projections) draws the same rows as the native
    model and matches the reference semantics."""
    transformers = pytest.importorskip("transformers")
    from centrifuge import filtered_loss, patch
    from centrifuge.models import LlamaForCausalLM

    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(F64)
    hf.save_pretrained(tmp_path)
    native = LlamaForCausalLM.from_pretrained(tmp_path, dtype=F64)
    ids, labels, kw = make_batch(seed=2, B=2, L=15, vocab=61, packed=True)
    layout = Layout.build(2, 15, position_ids=kw["position_ids"])
    keep = torch.rand(2, 15, generator=torch.Generator().manual_seed(4)) < 0.4
    keep &= ~layout.last_rows()
    keep[0, 6] = True

    patch(hf, backward=BackwardOptions(**opts))
    logits = hf(ids, **kw).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    filtered_loss(token_loss, keep[:, :-1]).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}

    out = native(ids, labels=labels, backward=BackwardOptions(**opts), **kw)
    out.plan.loss(out.token_loss, keep).backward()
    native_grads = grads(native)
    assert out.plan.sampled.any()
    reference_filtered_loss(native, ids, labels, keep, **out.plan.reference_knobs(keep), **kw).backward()
    ref = grads(native)
    assert_close(native_grads, ref)
    assert_close(hf_grads, ref, tol=1e-9)  # same seed and shape: the same sampled rows


# The new knobs on 3-layer models (room for a bottom, a compact and a top layer).
KEY_KNOBS = {
    "kvproj": dict(kv_projections=True),
    "kvproj+extra0.4": dict(kv_projections=True, extra=0.4),
    "top1": dict(exact_top=1),
    "top1+bottom1+kvproj": dict(exact_top=1, exact_layers=1, kv_projections=True),
    "top2+kvproj": dict(exact_top=2, kv_projections=True),
}


def three_layers(name, seed):
    return build_model(dataclasses.replace(get_preset(name), num_layers=3), dtype=F64, seed=seed)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("knob", list(KEY_KNOBS))
@pytest.mark.parametrize("path", ["compact", "dense"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "checkpointed"])
def test_top_exact_and_kv_projections_match_reference(name, knob, path, recompute):
    spec = KEY_KNOBS[knob]
    if path == "dense" and spec.get("extra"):
        pytest.skip("sampled rows need the compact path")
    model = three_layers(name, seed=4)
    if recompute:
        model.activation_checkpointing_enable()
    ids, labels, kw = make_batch(seed=len(name) + len(knob), packed=True, padded=True)
    opts = BackwardOptions(seed=7, path=path, **spec)
    plan, keep, ours, ref = knob_grads(model, ids, labels, opts, **kw)
    assert plan.compact == (path == "compact")
    if opts.kv_projections and path == "compact":
        key = plan.key_rows
        assert key.idx.numel() > 0 and not keep.reshape(-1)[key.idx].any()
        assert torch.equal(key.union[key.rows_pos], plan.rows_idx)
        assert torch.equal(key.union[key.pos], key.idx)
    assert_close(ours, ref)


KV_PATH = ("k_proj", "v_proj", "k_norm", "input_layernorm")


def test_kv_projections_reach_weights_not_the_residual_stream():
    """kv_projections changes the gradients of the K/V projections, the k norms
    and the input norms only, and no gradient enters a filtered row (the
    embedding output's gradient is zero there): everything else is the
    amplified gradient."""
    model = three_layers("tiny-qwen3", seed=5)
    ids, labels, kw = make_batch(seed=9, packed=True)
    embedded = []
    model.model.embed_tokens.register_forward_hook(lambda m, i, x: embedded.append(x) or x.retain_grad())
    out = model(ids, labels=labels, **kw)
    keep = Selector("random", 0.4, seed=2)(out.token_loss, out.valid)
    out.plan.loss(out.token_loss, keep).backward()
    amplified, dx_amplified = grads(model), embedded[-1].grad
    out = model(ids, labels=labels, backward=BackwardOptions(kv_projections=True), **kw)
    out.plan.loss(out.token_loss, keep).backward()
    ours, dx = grads(model), embedded[-1].grad
    assert dx[~keep].abs().max() == 0
    torch.testing.assert_close(dx, dx_amplified, rtol=1e-10, atol=1e-14)
    for name in amplified:
        if any(s in name for s in KV_PATH):
            assert (ours[name] - amplified[name]).abs().max() > 1e-3 * amplified[name].abs().max(), name
        else:
            torch.testing.assert_close(ours[name], amplified[name], rtol=1e-10, atol=1e-14, msg=name)


def test_kv_projections_key_rows_need_no_host_sync():
    """With host counts (kept rows, context rows on the host, as centrifuge train
    has them) the compact plan takes every row outside the backward set as key
    rows without waiting for the device: N - n_rows of them, the rows of no
    backward row among them (a document's tail and padding included)."""
    B, L = 3, 29
    pos = torch.arange(L).repeat(B, 1)
    pos[2, 13:] -= 13  # two documents in row 2
    layout = Layout.build(B, L, position_ids=pos)
    valid = ~layout.last_rows()
    valid[:, :4] = False  # a prompt: context rows
    valid[1, 20:] = False  # an unlabelled tail: neither kept nor context
    context = context_rows(valid, layout)
    sel = Selector("loss", 0.4)
    n = sel.count(valid)
    keep = sel(torch.rand(B, L, generator=torch.Generator().manual_seed(0)), valid, count=n)
    plan = Plan(layout, BackwardOptions(kv_projections=True))
    plan.set_context(context)
    assert _syncs(lambda: plan.set_keep(keep, n)) == []
    rows = (keep | context).reshape(-1)
    assert plan.key_rows.idx.numel() == B * L - plan.rows_idx.numel()
    assert torch.equal(plan.key_rows.idx, torch.nonzero(~rows).squeeze(1))
    assert (~rows & ~precedes((keep | context), layout).reshape(-1)).sum() > 0  # rows no query sees


@pytest.mark.parametrize("spec", [dict(kv_projections=True), dict(exact_top=1),
                                  dict(exact_top=1, exact_layers=1, kv_projections=True)])  # fmt: skip
@pytest.mark.parametrize("path", ["compact", "dense"])
def test_every_labelled_row_kept_gives_the_plain_gradient(spec, path):
    """ρ = 1 (every labelled row kept, prompts as context rows): the knobs give
    the plain model's gradient. The kept count is given, so the compact plan
    gathers instead of taking the ρ = 1 shortcut to a dense plan."""
    model = three_layers("tiny-gqa", seed=6)
    ids, labels, kw = make_batch(seed=4, packed=True, padded=True)
    token_loss, valid = reference_token_loss(model, ids, labels, None, **kw)
    ((token_loss * valid).sum() / valid.sum()).backward()
    plain = grads(model)
    out = model(ids, labels=labels, backward=BackwardOptions(path=path, **spec), **kw)
    out.plan.loss(out.token_loss, out.valid, count=int(out.valid.sum())).backward()
    assert out.plan.compact == (path == "compact")
    assert_close(grads(model), plain)


def test_new_knobs_change_the_gradient():
    """Neither knob is the amplified or the exact gradient in disguise. exact_top = 1
    is the amplified gradient plus, in the top layer only, what kv_projections
    adds there: a top layer's filtered rows get input gradient through their K/V
    alone (no later layer reads them), and it stops at the boundary."""
    model = three_layers("tiny-gqa", seed=2)
    ids, labels, kw = make_batch(seed=5, packed=True)
    keep = Selector("random", 0.4, seed=1)(*reference_token_loss(model, ids, labels, **kw))
    token_loss, _ = reference_token_loss(model, ids, labels, None, **kw)
    ((token_loss * keep).sum() / keep.sum()).backward()
    exact = grads(model)
    reference_filtered_loss(model, ids, labels, keep, **kw).backward()
    amplified = grads(model)

    def knob(**spec):
        out = model(ids, labels=labels, backward=BackwardOptions(**spec), **kw)
        out.plan.loss(out.token_loss, keep).backward()
        return grads(model)

    def differs(a, b, name):
        return (a[name] - b[name]).abs().max() > 1e-3 * b[name].abs().max()

    kvproj, top1, top2 = knob(kv_projections=True), knob(exact_top=1), knob(exact_top=2)
    for ours, name in ((kvproj, "model.layers.0.self_attn.k_proj.weight"),
                       (top2, "model.layers.0.mlp.up_proj.weight")):  # fmt: skip
        assert differs(ours, exact, name) and differs(ours, amplified, name)
    for name in exact:
        want = kvproj if ".layers.2." in name else amplified
        torch.testing.assert_close(top1[name], want[name], rtol=1e-10, atol=1e-14, msg=name)
    assert differs(top1, amplified, "model.layers.2.self_attn.v_proj.weight")
    assert_close(knob(exact_top=3), exact)  # every layer exact
