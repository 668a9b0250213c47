"""Activation checkpointing with the compact recompute (native model), in float64
on CPU: gradients against the reference semantics and against the same model
without checkpointing; what a checkpointed layer saves; that the recompute runs
on kept rows; the kept-query attention forward (reference and Triton kernel
under the interpreter)."""

import pytest
import torch

from centrifuge.models import build_model, get_preset
from centrifuge.models import layer as layer_mod
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss
from centrifuge.ops.attention import attention_forward_reference
from centrifuge.ops.attention_recompute import (
    attention_forward_rows,
    attention_forward_rows_reference,
)
from centrifuge.ops.rope import rope_cos_sin
from centrifuge.selection import Selector
from test_model_grads import CONFIGS, assert_close, compact_grads, grads, make_batch, untied

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpointed(name, seed):
    config = untied(name) if name == "tiny-qwen2" else get_preset(name)
    model = build_model(config, dtype=torch.float64, seed=seed)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    return model


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ratio,packed,padded", [(0.3, True, False), (0.6, False, True), (1.0, True, True)])
def test_checkpointed_amplified_matches_reference_and_uncheckpointed(name, ratio, packed, padded):
    model = checkpointed(name, seed=3)
    ids, labels, kw = make_batch(seed=int(10 * ratio), packed=packed, padded=padded)
    sel = Selector("random", ratio, "sequence", seed=5)
    loss, keep, ours = compact_grads(model, ids, labels, lambda o: sel(o.token_loss, o.valid), **kw)
    ref_loss = reference_filtered_loss(model, ids, labels, keep, **kw)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12)
    assert_close(ours, grads(model))
    model.activation_checkpointing_disable()
    _, _, plain = compact_grads(model, ids, labels, lambda o: keep, **kw)
    assert_close(ours, plain, tol=1e-12)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-qwen3"])
def test_checkpointed_exact_mode_and_unfilled_plan(name):
    model = checkpointed(name, seed=4)
    ids, labels, kw = make_batch(seed=9, packed=True, padded=True)
    sel = Selector("loss", 0.5)
    _, keep, ours = compact_grads(
        model, ids, labels, lambda o: sel(o.token_loss, o.valid), backward="exact", **kw
    )
    token_loss, valid = reference_token_loss(model, ids, labels, None, **kw)
    ((token_loss * keep).sum() / keep.sum()).backward()
    assert_close(ours, grads(model))
    # A plan that no selection filled: ordinary dense training, recomputed.
    out = model(ids, labels=labels, **kw)
    (out.token_loss.sum() / valid.sum()).backward()
    ours = grads(model)
    token_loss, _ = reference_token_loss(model, ids, labels, None, **kw)
    (token_loss.sum() / valid.sum()).backward()
    assert_close(ours, grads(model))


def _saved_activation_bytes(model, ids):
    """Bytes the decoder layers save for backward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    x = model.model.embed_tokens(ids)
    plan = model.make_plan(ids)
    cos, sin = rope_cos_sin(plan.layout.position_ids, model.inv_freq, x.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.model.layers:
            x = layer(x, cos, sin, plan)
    return total[0]


def test_checkpointed_layer_saves_input_and_lse_only():
    model = build_model(get_preset("tiny-gqa"), dtype=torch.float32, seed=0)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 24))
    full = _saved_activation_bytes(model, ids)
    model.activation_checkpointing_enable()
    ckpt = _saved_activation_bytes(model, ids)
    N = ids.numel()
    per_layer = 4 * N * (c.hidden_size + c.num_heads + 2 * c.head_dim)  # x, lse, cos, sin
    assert ckpt == c.num_layers * per_layer
    assert full > 5 * ckpt


def test_recompute_runs_on_kept_rows(monkeypatch):
    """With a compact plan the recompute computes the attention of the kept
    queries only; in exact mode the layer is recomputed on every row."""
    calls = []
    original = layer_mod.attention_forward_rows

    def spy(q, k, v, lse, layout, idx):
        calls.append((q.shape[0], k.shape[0] * k.shape[1], idx.numel()))
        return original(q, k, v, lse, layout, idx)

    monkeypatch.setattr(layer_mod, "attention_forward_rows", spy)
    model = checkpointed("tiny", seed=1)
    ids, labels, _ = make_batch(seed=2)
    compact_grads(model, ids, labels, lambda o: Selector("loss", 0.3)(o.token_loss, o.valid))
    n_keep = -(-int(((ids[:, 1:] >= 0).sum())) * 3 // 10)
    assert calls == [(n_keep, ids.numel(), n_keep)] * model.config.num_layers
    calls.clear()
    compact_grads(model, ids, labels, lambda o: o.valid, backward="exact")
    assert calls == []


def _attention_inputs(seed, B, L, H, Hkv, D, packed, ratio, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if packed:
        from test_attention_triton import packed_layout

        layout = packed_layout(B, L, g, L // 2)
    else:
        from centrifuge.plan import Layout

        layout = Layout.build(B, L)
    q = torch.randn(B, L, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=dtype)
    o, lse = attention_forward_reference(q, k, v, layout)
    idx = torch.nonzero(torch.rand(B * L, generator=g) < ratio).squeeze(1)
    q_rows = q.reshape(B * L, H, D)[idx]
    return q_rows, k, v, lse, layout, idx, o.reshape(B * L, H, D)[idx]


@pytest.mark.parametrize("packed", [False, True])
def test_kept_query_forward_reference_is_the_forward(packed):
    q, k, v, lse, layout, idx, want = _attention_inputs(0, 3, 29, 6, 2, 10, packed, 0.4)
    got = attention_forward_rows(q, k, v, lse, layout, idx)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="rows of idx"):
        attention_forward_rows(q[1:], k, v, lse, layout, idx)


@pytest.mark.parametrize(
    "B,L,H,Hkv,D,packed,ratio,blocks",
    [(2, 37, 4, 2, 12, False, 0.5, (16, 16)), (3, 40, 4, 1, 16, True, 0.6, (16, 32)),
     (1, 45, 2, 2, 8, True, 1.0, (32, 16)), (2, 33, 2, 1, 16, False, 0.1, (16, 16))],
)  # fmt: skip
def test_kept_query_forward_triton_matches_reference(B, L, H, Hkv, D, packed, ratio, blocks):
    pytest.importorskip("triton")
    from centrifuge.ops.attention_recompute_triton import attention_forward_rows_triton

    args = _attention_inputs(B * L + H, B, L, H, Hkv, D, packed, ratio, torch.float32)
    q, k, v, lse, layout, idx, _ = args
    want = attention_forward_rows_reference(q, k, v, lse, layout, idx)
    got = attention_forward_rows_triton(q, k, v, lse, layout, idx, block_m=blocks[0], block_n=blocks[1])
    assert ((got - want).norm() / want.norm()).item() < 2e-5


def test_bf16_autocast_checkpointed_step_tracks_fp32():
    model = build_model(get_preset("tiny-gqa"), seed=6)
    ids, labels, _ = make_batch(seed=13)
    keep_fn = lambda o: Selector("loss", 0.5)(o.token_loss, o.valid)  # noqa: E731
    _, keep, g32 = compact_grads(model, ids, labels, keep_fn)
    model.activation_checkpointing_enable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
        loss = out.plan.loss(out.token_loss, keep)
    loss.backward()
    g16 = grads(model)
    for name in g32:
        err = ((g16[name] - g32[name]).norm() / g32[name].norm()).item()
        assert err < 5e-2, f"{name}: {err:.3f}"


def test_train_cli_activation_checkpointing_gives_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from centrifuge.cli import main

    recomputed = []
    original = layer_mod.attention_forward_rows
    monkeypatch.setattr(
        layer_mod, "attention_forward_rows", lambda *a: recomputed.append(1) or original(*a)
    )
    common = ["train", "--model", "tiny", "--select", "loss", "--ratio", "0.5", "--steps", "3",
              "--seq-len", "32", "--batch-size", "2", "--eval-rows", "2", "--eval-problems", "0",
              "--eval-interval", "0", "--device", "cpu", "--quiet",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    weights = {}
    for name, extra in (("plain", []), ("ckpt", ["--activation-checkpointing"])):
        recomputed.clear()
        assert main([*common, "--out-dir", str(tmp_path / name), *extra]) == 0
        assert len(recomputed) == (3 * get_preset("tiny").num_layers if extra else 0)
        weights[name] = load_file(tmp_path / name / "checkpoint-3" / "model.safetensors")
    for k, w in weights["plain"].items():
        torch.testing.assert_close(weights["ckpt"][k], w, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "name,ratio,fused_qkv,fused_gate_up", [("tiny-gqa", 0.4, True, True), ("tiny-qwen3", 0.6, False, False)]
)
def test_checkpointed_on_kernel_path(name, ratio, fused_qkv, fused_gate_up, monkeypatch):
    """The recompute's compact activations (column views of fused outputs, compact
    rows read with no index) through the row-wise Triton kernels and the
    kept-query attention kernel, under the interpreter, in float32."""
    pytest.importorskip("triton")
    from test_step_structure import rel, set_structure, step_grads

    from centrifuge.ops import linear_ce, rmsnorm, rope, swiglu
    from centrifuge.ops.attention_recompute_triton import attention_forward_rows_triton

    for mod in (rmsnorm, swiglu, rope, linear_ce):
        monkeypatch.setattr(mod, "use_kernels", lambda t: t.dtype == torch.float32)
    monkeypatch.setattr(layer_mod, "attention_forward_rows", attention_forward_rows_triton)
    set_structure(monkeypatch, fused_qkv, fused_gate_up)
    model = build_model(get_preset(name), dtype=torch.float32, seed=2)
    model.activation_checkpointing_enable()
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    _, keep, ours = step_grads(model, ids, lambda o: Selector("loss", ratio)(o.token_loss, o.valid))
    reference_filtered_loss(model, ids, ids, keep).backward()
    for k, p in model.named_parameters():
        assert rel(ours[k], p.grad) < 1e-4, k


@pytest.mark.parametrize("spec", [dict(extra=0.5), dict(extra=0.4, extra_weight=1.5, exact_layers=1)])
def test_checkpointed_quality_knobs_equal_uncheckpointed(spec):
    """The recompute runs on the knob's rows (kept + sampled; every row in exact
    bottom layers): the same gradients as without checkpointing."""
    from centrifuge.plan import BackwardOptions

    model = checkpointed("tiny-gqa", seed=6)
    ids, labels, kw = make_batch(seed=11, packed=True, padded=False)
    sel = Selector("loss", 0.4)
    keep_fn = lambda o: sel(o.token_loss, o.valid)  # noqa: E731
    _, keep, ours = compact_grads(model, ids, labels, keep_fn, backward=BackwardOptions(**spec, seed=2), **kw)
    model.activation_checkpointing_disable()
    _, _, plain = compact_grads(model, ids, labels, lambda o: keep, backward=BackwardOptions(**spec, seed=2), **kw)
    assert_close(ours, plain, tol=1e-12)
