"""The Triton filtered attention backward against its plain PyTorch reference.

Runs under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET),
in float32, on tiny odd shapes with small tiles so every code path is hit:
several tiles per block, masked and unmasked tiles, blocks that straddle
document and batch-row boundaries, GQA, a head dim that is not a power of two.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from centrifuge.ops.attention import (  # noqa: E402
    attention_backward,
    attention_backward_reference,
    attention_forward_reference,
)
from centrifuge.ops.attention_triton import (  # noqa: E402
    BackwardConfig,
    attention_backward_triton,
    block_order,
    kept_row_bounds,
)
from centrifuge.plan import Layout  # noqa: E402

# Tiles of 16 rows on 30-40-token rows: several tiles per block and per document.
SMALL = BackwardConfig(16, 16, 4, 1, 16, 16, 4, 1)
UNEVEN = BackwardConfig(16, 32, 4, 1, 32, 16, 4, 1)
# float32 end to end, interpreter = numpy float32 dots: errors ~1e-7 (METHOD.md: far under 1e-3).
TOL = 2e-5


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed_layout(B, L, g, max_doc):
    pos = []
    for _ in range(B):
        row = []
        while len(row) < L:
            row.extend(range(int(torch.randint(1, max_doc + 1, (1,), generator=g))))
        pos.append(row[:L])
    return Layout.build(B, L, position_ids=torch.tensor(pos))


def inputs(seed, B, L, H, Hkv, D, packed, ratio):
    g = torch.Generator().manual_seed(seed)
    layout = packed_layout(B, L, g, L // 2) if packed else Layout.build(B, L)
    q = torch.randn(B, L, H, D, generator=g)
    k = torch.randn(B, L, Hkv, D, generator=g)
    v = torch.randn(B, L, Hkv, D, generator=g)
    o, lse = attention_forward_reference(q, k, v, layout)
    keep = torch.rand(B * L, generator=g) < ratio
    idx = torch.nonzero(keep).squeeze(1)
    do = torch.randn(idx.numel(), H, D, generator=g)
    return q, k, v, o, lse, do, layout, idx


def check(args, config, keep_idx=None, tol=TOL):
    q, k, v, o, lse, do, layout, idx = args
    idx = idx if keep_idx is None else keep_idx
    ref = attention_backward_reference(q, k, v, o, lse, do, layout, idx)
    # Poison: the kernels allocate their outputs, so check that nothing is NaN/unwritten.
    out = attention_backward_triton(q, k, v, o, lse, do, layout, idx, config=config)
    for name, a, b in zip(("dq", "dk", "dv"), out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert rel(a, b) < tol, f"{name}: relative error {rel(a, b):.2e}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_backward_matches_reference(seed, packed, ratio):
    args = inputs(seed, B=2, L=37, H=4, Hkv=2, D=16, packed=packed, ratio=ratio)
    check(args, SMALL)


@pytest.mark.parametrize("H,Hkv", [(3, 3), (6, 1)])
def test_mha_and_mqa_uneven_tiles(H, Hkv):
    args = inputs(3, B=3, L=29, H=H, Hkv=Hkv, D=16, packed=True, ratio=0.5)
    check(args, UNEVEN)


@pytest.mark.parametrize("split,atomic", [(1, True), (3, True), (6, True), (3, False)])
def test_group_split_partial_sums(split, atomic):
    """dK/dV of a KV head summed over query-head slices run as separate programs,
    by float32 atomics or per-slice buffers."""
    args = inputs(14, B=2, L=26, H=6, Hkv=1, D=16, packed=True, ratio=0.5)
    cfg = BackwardConfig(16, 16, 4, 1, 16, 16, 4, 1, kv_split=split, kv_atomic=atomic)
    check(args, cfg)
    with pytest.raises(ValueError, match="must divide"):
        attention_backward_triton(*args, config=BackwardConfig(kv_split=4))


def test_block_order_is_a_permutation_longest_first():
    keep_idx = torch.tensor([0, 1, 5, 6, 7, 9, 12, 13, 14])
    b = kept_row_bounds(keep_idx, torch.tensor([0, 8, 16], dtype=torch.int32))
    for kind in ("dq", "kv"):
        order = block_order(keep_idx, b, kind, 2)
        assert sorted(order.tolist()) == list(range(5))
    # Block 2 (rows 7, 9) straddles the documents: keys 0..9, the widest range.
    assert block_order(keep_idx, b, "dq", 2)[0].item() == 2
    # Blocks 0 (keys 0, 1) and 2 (keys 7, 9) are each seen by 5 kept queries; ties keep index order.
    assert block_order(keep_idx, b, "kv", 2)[0].item() == 0


def test_head_dim_not_power_of_two():
    args = inputs(4, B=2, L=23, H=2, Hkv=1, D=24, packed=True, ratio=0.6)
    check(args, SMALL)


def test_dense_when_keep_idx_is_none():
    args = inputs(5, B=2, L=33, H=4, Hkv=2, D=16, packed=True, ratio=1.0)
    q, k, v, o, lse, _, layout, _ = args
    do = torch.randn(2 * 33, 4, 16, generator=torch.Generator().manual_seed(6))
    check((q, k, v, o, lse, do, layout, None), SMALL)


def test_no_kept_row_gives_empty_outputs():
    q, k, v, o, lse, _, layout, _ = inputs(7, B=2, L=19, H=2, Hkv=1, D=16, packed=False, ratio=0.5)
    idx = torch.empty(0, dtype=torch.long)
    do = torch.empty(0, 2, 16)
    dq, dk, dv = attention_backward_triton(q, k, v, o, lse, do, layout, idx, config=SMALL)
    assert dq.shape == (0, 2, 16) and dk.shape == (0, 1, 16) and dv.shape == (0, 1, 16)


def test_single_kept_row_and_document_ends():
    """One kept row per document end (the rows with the most keys) and the very
    first row (only itself): the extremes of both kernels' loops."""
    q, k, v, o, lse, _, layout, _ = inputs(8, B=2, L=31, H=2, Hkv=2, D=16, packed=True, ratio=0)
    ends = torch.nonzero(layout.last_rows().reshape(-1)).squeeze(1)
    g = torch.Generator().manual_seed(9)
    do = torch.randn(ends.numel(), 2, 16, generator=g)
    check((q, k, v, o, lse, do, layout, ends), SMALL)
    # Row 0 sees only itself: p = 1, so dS = dO.v - dO.o = 0 and dq is exactly 0
    # (a relative error would compare rounding noise); dk, dv = (0, dO).
    idx, do = torch.tensor([0]), torch.randn(1, 2, 16, generator=g)
    dq, dk, dv = attention_backward_triton(q, k, v, o, lse, do, layout, idx, config=SMALL)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    assert rel(dv, do) < TOL


def test_strided_lse_as_flash_returns_it():
    """On CUDA the forward hands over flash's [H, B*L] logsumexp as a [B, H, L] view."""
    q, k, v, o, lse, do, layout, idx = inputs(10, B=2, L=21, H=4, Hkv=2, D=16, packed=True, ratio=0.5)
    B, H, L = lse.shape
    lse_view = lse.permute(1, 0, 2).contiguous().view(H, B, L).permute(1, 0, 2)
    assert not lse_view.is_contiguous()
    check((q, k, v, o, lse_view, do, layout, idx), SMALL)


def test_fp16_inputs():
    q, k, v, o, lse, do, layout, idx = inputs(11, B=2, L=27, H=2, Hkv=1, D=16, packed=True, ratio=0.5)
    half = [t.half() for t in (q, k, v, o)]
    ref = attention_backward_reference(*half, lse, do.half(), layout, idx)
    out = attention_backward_triton(*half, lse, do.half(), layout, idx, config=SMALL)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float16 and rel(a, b) < 5e-3


def test_kept_row_bounds():
    layout = Layout.build(2, 6, position_ids=torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    # documents over flat rows: [0,3) [3,5) [5,6) [6,10) [10,12)
    keep_idx = torch.tensor([1, 2, 4, 6, 9, 11])
    b = kept_row_bounds(keep_idx, layout.cu_seqlens)
    assert b.doc_start.tolist() == [0, 0, 3, 6, 6, 10]
    assert b.kept_end.tolist() == [2, 2, 3, 5, 5, 6]


def test_bad_inputs_are_named():
    q, k, v, o, lse, do, layout, idx = inputs(12, B=1, L=9, H=2, Hkv=1, D=16, packed=False, ratio=0.5)
    with pytest.raises(ValueError, match="do must be"):
        attention_backward_triton(q, k, v, o, lse, do[:0], layout, idx)
    with pytest.raises(ValueError, match="lse must be"):
        attention_backward_triton(q, k, v, o, lse.double(), do, layout, idx)
    with pytest.raises(ValueError, match="multiple"):
        attention_backward_triton(q[:, :, :1].expand(1, 9, 3, 16), k.expand(1, 9, 2, 16),
                                  v.expand(1, 9, 2, 16), o, lse, do, layout, idx)  # fmt: skip


def test_dispatch_on_cpu_is_the_reference():
    args = inputs(13, B=1, L=11, H=2, Hkv=1, D=16, packed=False, ratio=0.5)
    q, k, v, o, lse, do, layout, idx = args
    for a, b in zip(attention_backward(*args), attention_backward_reference(*args)):
        assert torch.equal(a, b)


def test_cached_bounds_follow_a_rewritten_buffer():
    """The per-step bounds cache keys on tensor identity; document bounds copied
    into the same buffer (CUDA graphs' fixed inputs) must not return the previous
    batch's bounds."""
    from centrifuge.ops import clear_step_caches as clear_bounds_cache
    from centrifuge.ops.attention_triton import _cached_bounds, kept_row_bounds, key_row_bounds
    from centrifuge.ops.step_cache import step_cached as _step_cached

    clear_bounds_cache()
    idx = torch.arange(12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    first = _cached_bounds(idx, cu)
    assert _cached_bounds(idx, cu) is first  # the layers of one step share them
    cu.copy_(torch.tensor([0, 8, 12], dtype=torch.int32))
    got, want = _cached_bounds(idx, cu), kept_row_bounds(idx, cu)
    assert torch.equal(got.doc_start, want.doc_start) and torch.equal(got.kept_end, want.kept_end)
    assert not torch.equal(got.doc_start, first.doc_start)
    keys, kept = torch.tensor([1, 6, 9]), torch.tensor([0, 2, 4, 10])  # kv_projections' key rows
    key_bounds = _step_cached("keys", key_row_bounds, keys, kept, cu)
    assert _step_cached("keys", key_row_bounds, keys, kept, cu) is key_bounds
    assert _cached_bounds(idx, cu) is got  # one entry per kind
    clear_bounds_cache()
    assert _step_cached("keys", key_row_bounds, keys, kept, cu) is not key_bounds
    clear_bounds_cache()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("config", [SMALL, UNEVEN], ids=["small", "uneven"])
def test_key_rows_match_the_zero_gradient_union(seed, packed, config):
    """kv_projections' key rows (filtered rows before a kept row of their
    document) as a second key set of the dK/dV kernel: the kept rows' gradients
    are unchanged, and the key rows get what the reference gives them when it
    runs on the union of both with a zero output gradient on the key rows."""
    from centrifuge.ops.attention import attention_backward_key_rows
    from centrifuge.plan import KeyRows, precedes

    q, k, v, o, lse, do, layout, idx = inputs(seed, B=2, L=37, H=4, Hkv=2, D=16, packed=packed, ratio=0.4)
    keep = torch.zeros(2 * 37, dtype=torch.bool)
    keep[idx] = True
    keys = torch.nonzero(precedes(keep.view(2, 37), layout).flatten() & ~keep).squeeze(1)
    assert keys.numel() > 0
    key_rows = KeyRows(keys, idx)
    want = attention_backward_key_rows(q, k, v, o, lse, do, layout, idx, key_rows)
    got = attention_backward_triton(q, k, v, o, lse, do, layout, idx, config=config, key_idx=keys)
    for name, a, b in zip(("dq", "dk", "dv", "dk keys", "dv keys"), got, want):
        assert a.shape == b.shape, name
        assert rel(a, b) < TOL, f"{name}: relative error {rel(a, b):.2e}"


@pytest.mark.parametrize("split,atomic", [(1, True), (2, True), (2, False)], ids=["stored", "atomic", "summed"])
def test_keys_no_kept_query_sees_get_exact_zeros(split, atomic):
    """Every row outside the kept set as a key row (what the plan gives
    kv_projections): a document's tail after its last kept row, a document with
    no kept row and padding get exactly zero dK, dV from the kernel (their blocks
    straddle documents and rows), and the other keys what the reference gives."""
    from centrifuge.ops.attention import attention_backward_key_rows
    from centrifuge.plan import KeyRows, precedes

    B, L, H, Hkv, D = 2, 40, 4, 2, 16
    docs = [[15, 12, 13], [25, 15]]  # row 1 ends in 15 padding rows
    pos = torch.tensor([[p for n in row for p in range(n)] for row in docs])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 25:] = False
    layout = Layout.build(B, L, position_ids=pos, attention_mask=mask)
    keep = torch.zeros(B * L, dtype=torch.bool)
    keep[[2, 5, 9, 30, 35, 40, 44, 50, 60]] = True  # none in row 0's second document
    idx = torch.nonzero(keep).squeeze(1)
    keys = torch.nonzero(~keep).squeeze(1)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, L, h, D, generator=g) for h in (H, Hkv, Hkv))
    o, lse = attention_forward_reference(q, k, v, layout)
    do = torch.randn(idx.numel(), H, D, generator=g)
    cfg = BackwardConfig(16, 16, 4, 1, 16, 16, 4, 1, kv_split=split, kv_atomic=atomic)
    got = attention_backward_triton(q, k, v, o, lse, do, layout, idx, config=cfg, key_idx=keys)
    want = attention_backward_key_rows(q, k, v, o, lse, do, layout, idx, KeyRows(keys, idx))
    unseen = ~precedes(keep.view(B, L), layout).reshape(-1)[keys]
    assert unseen.sum() > 25  # tails, a whole document, padding
    for name, a, b in zip(("dq", "dk", "dv", "dk keys", "dv keys"), got, want):
        assert rel(a, b) < TOL, f"{name}: relative error {rel(a, b):.2e}"
    for name, d in (("dk keys", got[3]), ("dv keys", got[4])):
        assert torch.equal(d[unseen], torch.zeros_like(d[unseen])), name
        assert d[~unseen].abs().amax(dim=(1, 2)).min() > 0, name


def test_key_rows_without_kept_queries_get_zeros():
    q, k, v, o, lse, _, layout, _ = inputs(3, B=1, L=20, H=2, Hkv=1, D=16, packed=False, ratio=0.5)
    none = torch.zeros(0, dtype=torch.long)
    got = attention_backward_triton(q, k, v, o, lse, torch.zeros(0, 2, 16), layout, none, config=SMALL,
                                    key_idx=torch.tensor([2, 5]))  # fmt: skip
    assert got[3].shape == (2, 1, 16) and not got[3].any() and not got[4].any()
