"""The decoder layer's GEMM structure switches (fused QKV / gate-up projections,
docs/kernels.md "Whole step") against the reference semantics, on CPU: float64
through the torch composition, and float32 with the row-wise Triton kernels
under the interpreter (in-place RoPE on the fused buffer, strided g/u views).
Also the helpers the switches rely on: in-place RoPE, the scatter's cached
inverse index."""

import pytest
import torch

import centrifuge.models.layer as layer_mod
import centrifuge.ops.rope as rope
from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss
from centrifuge.ops import rmsnorm_triton
from centrifuge.selection import Selector

STRUCTURES = [(True, False), (False, False), (True, True), (False, True)]  # (fused_qkv, fused_gate_up)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_structure(monkeypatch, fused_qkv, fused_gate_up):
    monkeypatch.setitem(layer_mod.PERF, "fused_qkv", fused_qkv)
    monkeypatch.setitem(layer_mod.PERF, "fused_gate_up", fused_gate_up)


def step_grads(model, ids, keep_fn, **kw):
    out = model(ids, labels=ids, **kw)
    keep = keep_fn(out)
    out.plan.loss(out.token_loss, keep).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, keep, ours


# GQA + llama3 RoPE unpacked, bias + tied head packed; q/k norm (projections stay separate).
CASES = [(s, n, p) for s in STRUCTURES for n, p in (("tiny-gqa", False), ("tiny-qwen2", True))]
CASES.append(((True, True), "tiny-qwen3", True))


@pytest.mark.parametrize("structure,name,packed", CASES)
def test_structures_match_reference_float64(structure, name, packed, monkeypatch):
    fused_qkv, fused_gate_up = structure
    _structure_matches_reference(name, fused_qkv, fused_gate_up, packed, monkeypatch)


def _structure_matches_reference(name, fused_qkv, fused_gate_up, packed, monkeypatch):
    set_structure(monkeypatch, fused_qkv, fused_gate_up)
    model = build_model(get_preset(name), dtype=torch.float64, seed=4)
    g = torch.Generator().manual_seed(len(name) + 7 * packed)
    B, L = 3, 19
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=g)
    kw = {}
    if packed:
        kw["position_ids"] = torch.cat([torch.arange(8), torch.arange(L - 8)]).expand(B, L)
    sel = Selector("loss", 0.45)
    _, keep, ours = step_grads(model, ids, lambda o: sel(o.token_loss, o.valid), **kw)
    reference_filtered_loss(model, ids, ids, keep, **kw).backward()
    for k, p in model.named_parameters():
        assert rel(ours[k], p.grad) < 1e-10, k


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The row-wise ops on their Triton kernels for CPU float32 (interpreter)."""
    import centrifuge.ops.linear_ce as lce
    import centrifuge.ops.rmsnorm as rms
    import centrifuge.ops.swiglu as swi

    on = lambda t: t.dtype == torch.float32  # noqa: E731
    for mod in (rms, swi, rope, lce):
        monkeypatch.setattr(mod, "use_kernels", on)


@pytest.mark.parametrize("fused_qkv,fused_gate_up", [(True, True), (True, False)])
@pytest.mark.parametrize("name,ratio", [("tiny-gqa", 0.4), ("tiny-qwen2", 0.6)])
def test_structures_on_kernel_path(name, ratio, fused_qkv, fused_gate_up, kernels_on_cpu, monkeypatch):
    set_structure(monkeypatch, fused_qkv, fused_gate_up)
    model = build_model(get_preset(name), dtype=torch.float32, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    out, keep, ours = step_grads(model, ids, lambda o: Selector("loss", ratio)(o.token_loss, o.valid))
    with torch.no_grad():
        ref_token_loss, _ = reference_token_loss(model, ids, ids, None)
    reference_filtered_loss(model, ids, ids, keep).backward()
    assert rel(out.token_loss, ref_token_loss) < 1e-5
    for k, p in model.named_parameters():
        assert rel(ours[k], p.grad) < 1e-4, k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_rope_forward_in_place_on_a_column_view(seed, use_kernel, monkeypatch):
    monkeypatch.setattr(rope, "use_kernels", lambda t: use_kernel)
    g = torch.Generator().manual_seed(seed)
    N, H, Hkv, D = 13, 3, 1, 10
    buf = torch.randn(N, (H + 2 * Hkv) * D, generator=g)
    before = buf.clone()
    pos = torch.randint(0, 40, (N,), generator=g)
    cos, sin = rope.rope_cos_sin(pos, rope.inv_frequencies(D, 10000.0), torch.float32)
    q = buf[:, : H * D].view(N, H, D)
    expected = rope.rope_reference(before[:, : H * D].view(N, H, D), cos, sin)
    out = rope.rope_forward(q, cos, sin, out=q)
    assert out.data_ptr() == q.data_ptr()
    assert rel(buf[:, : H * D].view(N, H, D), expected) < 1e-6
    assert torch.equal(buf[:, H * D :], before[:, H * D :])  # the k, v columns untouched


def test_inverse_index_cached_per_index():
    idx = torch.tensor([1, 4, 5])
    inv = rmsnorm_triton._inverse_index(idx, 7)
    assert inv.tolist() == [-1, 0, -1, -1, 1, 2, -1]
    assert rmsnorm_triton._inverse_index(idx, 7) is inv  # same index object: reused
    other = torch.tensor([0, 6])
    assert rmsnorm_triton._inverse_index(other, 7).tolist() == [0, -1, -1, -1, -1, -1, 1]
    idx2 = torch.tensor([2, 3])
    first = rmsnorm_triton._inverse_index(idx2, 5)
    idx2[0] = 0  # modified in place: the cache must notice
    again = rmsnorm_triton._inverse_index(idx2, 5)
    assert again is not first and again.tolist() == [0, -1, -1, 1, -1]
