import math

import pytest
import torch

from centrifuge.plan import Layout, Plan
from centrifuge.selection import Selector, keep_from_mask, num_keep


def test_layout_packed_documents_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    lay = Layout.build(2, 6, position_ids=pos)
    assert lay.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert lay.cu_seqlens.tolist() == [0, 3, 5, 6, 12]
    assert lay.max_seqlen == 6 and lay.packed
    assert lay.last_rows().tolist() == [
        [False, False, True, False, True, True],
        [False, False, False, False, False, True],
    ]


def test_layout_padding_is_its_own_segment():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    lay = Layout.build(2, 5, attention_mask=mask)
    assert lay.position_ids.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    seg = lay.segment_ids
    assert seg[0, 2] != seg[0, 1] and seg[1, 3] != seg[1, 2]
    assert Layout.build(1, 4).cu_seqlens.tolist() == [0, 4] and not Layout.build(1, 4).packed


def test_layout_shape_errors():
    with pytest.raises(ValueError, match="position_ids has shape"):
        Layout.build(2, 5, position_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        Layout.build(2, 5, attention_mask=torch.ones(2, 4))


def test_plan_loss_and_errors():
    plan = Plan(Layout.build(2, 3))
    tl = torch.arange(6.0).view(2, 3).requires_grad_()
    keep = torch.tensor([[True, False, True], [False, False, True]])
    loss = plan.loss(tl, keep)
    assert loss.item() == pytest.approx((0 + 2 + 5) / 3)
    assert plan.keep_idx.tolist() == [0, 2, 5] and plan.n_keep == 3 and plan.compact
    with pytest.raises(ValueError, match="keeps no token"):
        plan.loss(tl, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep mask has shape"):
        plan.set_keep(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_loss has shape"):
        plan.loss(tl[:, :2], keep[:, :2])
    with pytest.raises(ValueError, match="backward mode"):
        Plan(Layout.build(1, 2), mode="sparse")
    # Only document ends filtered: the dense backward is exact, the plan stays dense.
    packed = Plan(Layout.build(2, 3, position_ids=torch.tensor([[0, 1, 0], [0, 1, 2]])))
    packed.set_keep(torch.tensor([[True, False, False], [True, True, False]]))
    assert not packed.compact and packed.n_keep == 3
    packed.set_keep(torch.tensor([[False, True, False], [True, True, False]]))
    assert packed.compact
    exact = Plan(Layout.build(2, 3), mode="exact")
    exact.loss(tl, keep)
    assert exact.keep_idx is None and exact.n_keep == 3 and not exact.compact


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\]"):
        Selector("loss", ratio)


def test_unknown_method_and_granularity():
    with pytest.raises(ValueError, match="unknown selection method"):
        Selector("topk", 0.5)
    with pytest.raises(ValueError, match="unknown granularity"):
        Selector("loss", 0.5, granularity="document")


def test_num_keep_is_exact_ceil():
    assert num_keep(10, 0.3) == 3
    assert num_keep(10, 0.31) == 4
    assert num_keep(7, 0.5) == 4
    assert num_keep(3, 1e-6) == 1
    for n in range(1, 60):
        for r in (0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
            assert num_keep(n, r) == math.ceil(round(r * n, 9))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 0.77, 1.0])
def test_topk_counts_and_validity(seed, granularity, ratio):
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 37
    loss = torch.rand(B, L, generator=g)
    valid = torch.rand(B, L, generator=g) > 0.3
    keep = Selector("loss", ratio, granularity)(loss, valid)
    assert not (keep & ~valid).any()
    if granularity == "batch":
        assert int(keep.sum()) == num_keep(int(valid.sum()), ratio)
        kept_min = loss[keep].min()
        assert (loss[valid & ~keep] <= kept_min).all()
    else:
        for b in range(B):
            assert int(keep[b].sum()) == num_keep(int(valid[b].sum()), ratio)


def test_ties_are_broken_by_position_and_never_pick_invalid():
    loss = torch.zeros(1, 8)
    valid = torch.tensor([[False, True, True, False, True, True, True, True]])
    keep = Selector("loss", 0.5)(loss, valid)
    assert keep.tolist() == [[False, True, True, False, True, False, False, False]]
    # -inf scores on valid rows still rank before invalid rows.
    loss = torch.full((1, 4), float("-inf"))
    valid = torch.tensor([[False, True, False, True]])
    assert Selector("loss", 1.0)(loss, valid).tolist() == [[False, True, False, True]]


def test_rho1_uses_excess_loss_and_checks_reference():
    loss = torch.tensor([[3.0, 2.0, 5.0, 1.0]])
    ref = torch.tensor([[0.5, 1.9, 4.9, 0.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    keep = Selector("rho1", 0.5)(loss, valid, ref)
    assert keep.tolist() == [[True, False, False, True]]  # excess 2.5, 0.1, 0.1, 1.0
    with pytest.raises(ValueError, match="needs reference losses"):
        Selector("rho1", 0.5)(loss, valid)
    with pytest.raises(ValueError, match="reference losses have shape"):
        Selector("rho1", 0.5)(loss, valid, ref[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        Selector("rho1", 0.5)(loss, valid, torch.full_like(ref, float("nan")))


def test_no_valid_tokens_is_an_error():
    loss = torch.rand(2, 5)
    with pytest.raises(ValueError, match="no valid token"):
        Selector("loss", 0.5)(loss, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid mask has shape"):
        Selector("loss", 0.5)(loss, torch.ones(2, 4, dtype=torch.bool))


def test_random_and_none():
    loss = torch.rand(2, 50)
    valid = torch.ones(2, 50, dtype=torch.bool)
    a = Selector("random", 0.3, seed=7)(loss, valid)
    b = Selector("random", 0.3, seed=7)(loss, valid)
    c = Selector("random", 0.3, seed=8)(loss, valid)
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 30
    valid[0, :10] = False
    assert torch.equal(Selector("none", 0.1)(loss, valid), valid)


def test_random_draws_anew_every_call_from_one_seeded_source():
    loss, valid = torch.rand(2, 50), torch.ones(2, 50, dtype=torch.bool)

    def masks(selector, n=3):
        return [selector(loss, valid) for _ in range(n)]

    def distinct(ms):
        return all(not torch.equal(a, b) for i, a in enumerate(ms) for b in ms[i + 1 :])

    seeded = masks(Selector("random", 0.3, seed=7))
    assert distinct(seeded)
    assert all(map(torch.equal, seeded, masks(Selector("random", 0.3, seed=7))))
    # A caller's generator seeded alike draws the same sequence.
    own = masks(Selector("random", 0.3, seed=torch.Generator().manual_seed(7)))
    assert all(map(torch.equal, seeded, own))
    # Resume: the state after one call continues with the second and third masks.
    first = Selector("random", 0.3, seed=7)
    first(loss, valid)
    resumed = Selector("random", 0.3, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert all(map(torch.equal, seeded[1:], masks(resumed, 2)))
    # seed=None: torch's default generator, fixed by torch.manual_seed.
    torch.manual_seed(3)
    default = masks(Selector("random", 0.3, seed=None))
    torch.manual_seed(3)
    assert distinct(default) and all(map(torch.equal, default, masks(Selector("random", 0.3, seed=None))))
    assert Selector("random", 0.3, seed=None).state_dict() == {}
    with pytest.raises(ValueError, match="torch's default generator"):
        Selector("random", 0.3, seed=None).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="seed must be an int"):
        Selector("random", 0.3, seed="7")


def test_keep_from_mask():
    valid = torch.tensor([[True, True, False]])
    assert keep_from_mask(torch.tensor([[1, 0, 1]]), valid).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="keeps no valid token"):
        keep_from_mask(torch.tensor([[0, 0, 1]]), valid)
    with pytest.raises(ValueError, match="keep mask has shape"):
        keep_from_mask(torch.ones(1, 2), valid)


# --- selection and plan without host syncs (kept count known beforehand) ------

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item"}


def _syncs(fn):
    """Host-sync ops ``fn`` runs, leaving out the asynchronous device asserts (on
    CPU ``_assert_async`` reads its flag at once; on CUDA it does not wait)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def under_assert(e):
        while e is not None:
            if e.name == "aten::_assert_async":
                return True
            e = e.cpu_parent
        return False

    return [e.name for e in prof.events() if e.name in SYNC_OPS and not under_assert(e)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["loss", "rho1", "random"])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_selection_and_plan_with_host_count_match_and_do_not_sync(seed, method, granularity):
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 37
    pos = torch.arange(L).repeat(B, 1)
    pos[1, 11:] -= 11  # two documents in row 1
    layout = Layout.build(B, L, position_ids=pos)
    tl = torch.rand(B, L, generator=g)
    ref = torch.rand(B, L, generator=g)
    valid = (torch.rand(B, L, generator=g) < 0.8) & ~layout.last_rows()
    ratio = [0.3, 0.5, 0.77][seed]
    want = Selector(method, ratio, granularity, seed=5)(tl, valid, ref)
    sel = Selector(method, ratio, granularity, seed=5)
    count = sel.count(valid)
    plan, want_plan = Plan(layout), Plan(layout)
    want_plan.set_keep(want)

    def run():
        run.keep = sel(tl, valid, ref, count=count)
        plan.set_keep(run.keep, count)

    assert _syncs(run) == []
    assert torch.equal(run.keep, want)
    assert plan.n_keep == count == int(want.sum())
    assert torch.equal(plan.keep_idx, want_plan.keep_idx)


def test_host_count_errors_are_caught_on_the_device():
    layout = Layout.build(2, 8)
    tl, valid = torch.rand(2, 8), torch.ones(2, 8, dtype=torch.bool)
    tl[0, 3] = float("nan")
    sel = Selector("loss", 0.5)
    with pytest.raises(RuntimeError, match="NaN"):
        sel(tl, valid, count=sel.count(valid))
    keep = Selector("loss", 0.5)(torch.rand(2, 8), valid)
    with pytest.raises(RuntimeError, match="kept count disagree"):
        Plan(layout).set_keep(keep, int(keep.sum()) + 1)
    with pytest.raises(ValueError, match="no valid token"):
        sel(tl, torch.zeros(2, 8, dtype=torch.bool), count=0)


def test_layout_is_computed_where_its_inputs_live():
    """CPU position ids (or none) give a layout computed on the host and moved to
    the target device: no step of it waits for the GPU. The meta device stands in
    for a GPU here: it holds no data, so computing the document starts on it
    would fail."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    want = Layout.build(2, 6, position_ids=pos)
    for given in (pos, None):
        lay = Layout.build(2, 6, "meta", position_ids=given)
        assert lay.position_ids.is_meta and lay.segment_ids.is_meta and lay.cu_seqlens.is_meta
        assert lay.max_seqlen == (want.max_seqlen if given is not None else 6)
