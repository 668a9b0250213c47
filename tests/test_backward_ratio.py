"""A backward set larger than the loss set (``BackwardOptions.backward_ratio`` ρ_b):
the valid rows the selection ranks next after the ρ·n kept ones, up to ρ_b·n,
join the backward without a loss, as context rows do. The ranking against the
selection at ρ_b; the fast paths against the reference semantics in float64
(packed and padded batches with context rows); ρ_b = 1 against the exact
masked-loss gradient."""

import dataclasses

import pytest
import torch

from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss
from centrifuge.plan import BackwardOptions, Layout, Plan, context_rows
from centrifuge.selection import Selector
from test_model_grads import assert_close, grads, make_batch
from test_plan_selection import _syncs

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


@pytest.mark.parametrize("method", ["loss", "random"])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_ranked_rows_are_the_next_in_the_selection_order(method, granularity):
    """keep | ranked is what the same selection at ρ_b keeps (the same scores, the
    same random draw); the host counts give the same masks without a sync."""
    g = torch.Generator().manual_seed(3)
    token_loss = torch.randn(3, 41, generator=g)
    valid = torch.rand(3, 41, generator=g) > 0.2

    def sel(ratio):
        return Selector(method, ratio, granularity, seed=5)

    keep, ranked = sel(0.3).select(token_loss, valid, backward_ratio=0.7)
    assert keep.equal(sel(0.3)(token_loss, valid))
    assert (keep | ranked).equal(sel(0.7)(token_loss, valid))
    assert ranked.any() and not (keep & ranked).any() and not (ranked & ~valid).any()
    s = sel(0.3)
    n, nb = s.count(valid), s.count(valid, 0.7)
    assert (int(keep.sum()), int(ranked.sum())) == (n, nb - n)
    k2, r2 = sel(0.3).select(token_loss, valid, count=n, backward_ratio=0.7, backward_count=nb)
    assert k2.equal(keep) and r2.equal(ranked)
    # ρ_b = ρ ranks nothing next; without a backward ratio there is no ranked mask.
    assert not sel(0.3).select(token_loss, valid, backward_ratio=0.3)[1].any()
    assert sel(0.3).select(token_loss, valid)[1] is None
    # Without filtering nothing is left to rank.
    k_all, r_none = Selector("none").select(token_loss, valid, backward_ratio=1.0)
    assert k_all.equal(valid) and not r_none.any()


@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_host_counted_ranked_rows_do_not_sync(granularity):
    """With the kept and backward counts from the host (as centrifuge train has
    them), selection and plan gather kept + context + ranked rows without a sync."""
    B, L = 3, 31
    pos = torch.arange(L).repeat(B, 1)
    pos[1, 12:] -= 12  # two documents in row 1
    layout = Layout.build(B, L, position_ids=pos)
    valid = ~layout.last_rows()
    valid[:, :4] = False  # a prompt at the start of every row
    context = context_rows(valid, layout)
    token_loss = torch.rand(B, L, generator=torch.Generator().manual_seed(0))
    sel = Selector("loss", 0.4, granularity)
    n, nb = sel.count(valid), sel.count(valid, 0.7)
    opts = BackwardOptions(backward_ratio=0.7)
    plan = Plan(layout, opts)
    plan.set_context(context)

    def run():
        run.keep, run.ranked = sel.select(token_loss, valid, count=n, backward_ratio=0.7, backward_count=nb)
        plan.set_ranked(run.ranked, nb - n)
        plan.set_keep(run.keep, n)

    assert _syncs(run) == []
    assert torch.equal(plan.rows_idx, torch.nonzero((run.keep | context | run.ranked).reshape(-1)).squeeze(1))
    assert torch.equal(plan.keep_idx, torch.nonzero(run.keep.reshape(-1)).squeeze(1))


def ranked_grads(model, ids, labels, opts, selector, host_counts=False, **kw):
    """Fast-path gradients with ranked rows, and the reference semantics'
    gradients for the same keep and ranked masks (and sampled rows, if any)."""
    out = model(ids, labels=labels, backward=opts, **kw)
    counts = {}
    if host_counts:  # as centrifuge train does: from the labels, before the loss exists
        n = selector.count(out.valid)
        counts = dict(count=n, backward_count=selector.count(out.valid, opts.backward_ratio))
    keep, ranked = selector.select(out.token_loss, out.valid, backward_ratio=opts.backward_ratio,
                                   **counts)  # fmt: skip
    out.plan.set_ranked(ranked, counts and counts["backward_count"] - counts["count"] or None)
    out.plan.loss(out.token_loss, keep, counts.get("count")).backward()
    ours = grads(model)
    reference_filtered_loss(model, ids, labels, keep, kv_weight=out.plan.kv_weight(keep), **kw).backward()
    by_mask = grads(model)
    reference_filtered_loss(model, ids, labels, keep, ranked=ranked, **kw).backward()
    return out.plan, keep, ranked, ours, by_mask, grads(model)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
@pytest.mark.parametrize("knobs", [dict(path="compact"), dict(path="dense"), dict(extra=0.4)])
def test_ranked_rows_match_the_reference(name, granularity, knobs):
    model = build_model(get_preset(name), dtype=F64, seed=1)
    ids, labels, kw = make_batch(seed=4, packed=True, padded=True)  # a batch with context rows
    opts = BackwardOptions(seed=2, backward_ratio=0.65, **knobs)
    plan, keep, ranked, ours, by_mask, ref = ranked_grads(model, ids, labels, opts,
                                                          Selector("loss", 0.3, granularity), **kw)  # fmt: skip
    assert ranked.any() and plan.context.any()
    assert plan.compact == (knobs.get("path") != "dense")
    if opts.extra:
        assert_close(ours, by_mask)  # sampled rows: the reference takes the plan's weights
        assert plan.sampled.any() and not (plan.sampled & (keep | ranked)).any()
    else:
        assert_close(by_mask, ref)  # the plan's weights are the written semantics
        assert_close(ours, ref)


def test_host_counts_give_the_same_gradients():
    """The training loop's sync-free way (counts from the labels, set_ranked with
    a host count) computes what the counting plan computes."""
    model = build_model(get_preset("tiny-qwen3"), dtype=F64, seed=4)
    ids, labels, kw = make_batch(seed=9, packed=True, padded=True)
    opts = BackwardOptions(backward_ratio=0.8)
    *_, ours, _, ref = ranked_grads(model, ids, labels, opts, Selector("loss", 0.5), True, **kw)
    assert_close(ours, ref)


def test_backward_ratio_one_is_the_exact_gradient_and_between_differs():
    model = build_model(get_preset("tiny-gqa"), dtype=F64, seed=2)
    ids, labels, kw = make_batch(seed=5, packed=True, padded=True)
    selector = Selector("random", 0.4, seed=1)
    keep = selector(*reference_token_loss(model, ids, labels, **kw))
    token_loss, valid = reference_token_loss(model, ids, labels, None, **kw)
    ((token_loss * keep).sum() / keep.sum()).backward()
    exact = grads(model)
    reference_filtered_loss(model, ids, labels, keep, **kw).backward()
    amplified = grads(model)
    name = "model.layers.0.self_attn.k_proj.weight"
    for ratio in (1.0, 0.7):
        out = model(ids, labels=labels, backward=BackwardOptions(backward_ratio=ratio), **kw)
        # The same draw as `keep` came from: a selector with the same seed.
        k, ranked = Selector("random", 0.4, seed=1).select(out.token_loss, out.valid, backward_ratio=ratio)
        assert k.equal(keep)
        out.plan.set_ranked(ranked)
        out.plan.loss(out.token_loss, keep).backward()
        ours = grads(model)
        if ratio == 1.0:
            assert (keep | ranked).equal(valid)
            assert_close(ours, exact)
        else:
            for other in (exact, amplified):
                assert (ours[name] - other[name]).abs().max() > 1e-3 * other[name].abs().max()


def test_bad_backward_ratio_fails_clearly():
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="backward_ratio must lie in"):
            BackwardOptions(backward_ratio=bad)
    with pytest.raises(ValueError, match="mode 'exact'"):
        BackwardOptions("exact", backward_ratio=0.5)
    opts = BackwardOptions.parse("backward_ratio=0.7,exact_layers=1")
    assert opts.backward_ratio == 0.7 and opts.describe() == "amplified+exact1+backward0.7"
    token_loss, valid = torch.rand(2, 9), torch.ones(2, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="below the keep ratio"):
        Selector("loss", 0.5).select(token_loss, valid, backward_ratio=0.4)
    with pytest.raises(ValueError, match="backward_count"):
        Selector("loss", 0.5).select(token_loss, valid, count=9, backward_ratio=0.7)
    model = build_model(get_preset("tiny"), dtype=F64, seed=0)
    ids, labels, _ = make_batch(seed=1)
    out = model(ids, labels=labels, backward=BackwardOptions(backward_ratio=0.7))
    keep, ranked = Selector("loss", 0.5).select(out.token_loss, out.valid, backward_ratio=0.7)
    with pytest.raises(ValueError, match="needs the rows ranked next"):
        out.plan.loss(out.token_loss, keep)
    plain = model(ids, labels=labels)
    with pytest.raises(ValueError, match="only with BackwardOptions"):
        plain.plan.set_ranked(ranked)


def test_the_hf_patch_refuses_backward_ratio():
    from transformers import LlamaConfig, LlamaForCausalLM

    from centrifuge import patch

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="does not take backward_ratio"):
        patch(LlamaForCausalLM(cfg), backward=BackwardOptions(backward_ratio=0.7))


@pytest.mark.parametrize("path", ["compact", "dense"])
@pytest.mark.parametrize("knobs", [dict(kv_projections=True), dict(exact_top=1),
                                   dict(exact_top=1, exact_layers=1, kv_projections=True)])  # fmt: skip
def test_ranked_rows_are_in_the_backward_set_of_the_other_knobs(path, knobs):
    """kv_projections and exact_top act on the rows outside the backward set:
    ranked rows are inside it (full K/V gradient, no stop at the top layers'
    boundary), and the fast paths match the reference semantics written with
    ``ranked=`` directly, not through the plan's weights."""
    model = build_model(dataclasses.replace(get_preset("tiny-gqa"), num_layers=3), dtype=F64, seed=3)
    ids, labels, kw = make_batch(seed=6, packed=True, padded=True)
    opts = BackwardOptions(path=path, backward_ratio=0.7, **knobs)
    out = model(ids, labels=labels, backward=opts, **kw)
    keep, ranked = Selector("loss", 0.3).select(out.token_loss, out.valid, backward_ratio=0.7)
    out.plan.set_ranked(ranked)
    out.plan.loss(out.token_loss, keep).backward()
    ours = grads(model)
    assert ranked.any() and out.plan.compact == (path == "compact")
    if out.plan.key_rows is not None:  # kv_projections, compact: no ranked row takes that path
        assert not (keep | ranked).reshape(-1)[out.plan.key_rows.idx].any()
    written = dict(ranked=ranked, exact_layers=opts.exact_layers, exact_top=opts.exact_top,
                   kv_projections=opts.kv_projections)  # fmt: skip
    reference_filtered_loss(model, ids, labels, keep, **written, **kw).backward()
    ref = grads(model)
    assert_close(ours, ref)
    # Without the ranked rows in the backward set the same knobs give another gradient.
    reference_filtered_loss(model, ids, labels, keep, **{**written, "ranked": None}, **kw).backward()
    other = grads(model)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert (ref[name] - other[name]).abs().max() > 1e-3 * ref[name].abs().max()
