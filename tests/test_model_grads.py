"""Whole-model gradients of the compact backward against the reference semantics
(docs/design.md), in float64 on CPU."""

import dataclasses

import pytest
import torch

from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss
from centrifuge.selection import Selector

CONFIGS = ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3"]  # MHA, GQA+llama3 rope, bias+tied, qk-norm


def untied(name):
    c = get_preset(name)
    c.tie_word_embeddings = False
    return c


def make_batch(seed, B=3, L=23, vocab=512, packed=False, padded=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = ids.clone()
    kw = {}
    if packed:
        pos = []
        for _ in range(B):
            row = []
            while len(row) < L:
                row.extend(range(int(torch.randint(2, L // 2, (1,), generator=g))))
            pos.append(row[:L])
        kw["position_ids"] = torch.tensor(pos)
    if padded:  # right padding on row 0, left padding on row 1, a prompt on row 2
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, -5:] = 0
        mask[1, :4] = 0
        labels[~mask.bool()] = -100
        labels[2, :6] = -100
        kw["attention_mask"] = mask
    return ids, labels, kw


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_close(ours, ref, tol=1e-10):
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-30)
        err = ((ours[name] - ref[name]).abs().max() / scale).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def compact_grads(model, ids, labels, keep_fn, backward="amplified", **kw):
    out = model(ids, labels=labels, backward=backward, **kw)
    keep = keep_fn(out)
    loss = out.plan.loss(out.token_loss, keep)
    loss.backward()
    return loss.detach(), keep, grads(model)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ratio", [1e-3, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_amplified_matches_reference(name, ratio, granularity):
    model = build_model(get_preset(name), dtype=torch.float64, seed=1)
    ids, labels, kw = make_batch(seed=int(ratio * 1000) + len(name))
    sel = Selector("loss", ratio, granularity)
    loss, keep, ours = compact_grads(model, ids, labels, lambda o: sel(o.token_loss, o.valid), **kw)
    ref_loss = reference_filtered_loss(model, ids, labels, keep, **kw)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12)
    assert_close(ours, grads(model))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("packed,padded", [(True, False), (False, True), (True, True)])
def test_amplified_packed_and_padded(name, packed, padded):
    config = untied(name) if name == "tiny-qwen2" else get_preset(name)
    model = build_model(config, dtype=torch.float64, seed=2)
    ids, labels, kw = make_batch(seed=7, packed=packed, padded=padded)
    sel = Selector("random", 0.4, "sequence", seed=3)
    _, keep, ours = compact_grads(model, ids, labels, lambda o: sel(o.token_loss, o.valid), **kw)
    reference_filtered_loss(model, ids, labels, keep, **kw).backward()
    assert_close(ours, grads(model))


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-qwen3"])
def test_exact_mode_is_plain_masked_loss(name):
    model = build_model(get_preset(name), dtype=torch.float64, seed=3)
    ids, labels, kw = make_batch(seed=11, packed=True, padded=True)
    sel = Selector("loss", 0.5)
    _, keep, ours = compact_grads(
        model, ids, labels, lambda o: sel(o.token_loss, o.valid), backward="exact", **kw
    )
    token_loss, _ = reference_token_loss(model, ids, labels, None, **kw)  # no detach at all
    ((token_loss * keep).sum() / keep.sum()).backward()
    assert_close(ours, grads(model))


def test_filtered_rows_get_no_gradient_and_exact_differs():
    """Amplified sparsity: the embedding rows of tokens seen only at filtered
    positions get no gradient; the masked-loss baseline does give them one."""
    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=4)
    ids = torch.arange(40).view(1, 40)  # every token id appears once
    keep = torch.zeros(1, 40, dtype=torch.bool)
    keep[0, 5:15] = True
    g = {}
    for mode in ("amplified", "exact"):
        out = model(ids, labels=ids, backward=mode)
        out.plan.loss(out.token_loss, keep).backward()
        g[mode] = grads(model)["model.embed_tokens.weight"]
    # Row t's loss uses label t+1 = id t+1 (through lm_head, not the embedding).
    assert (g["amplified"][15:40] == 0).all() and (g["amplified"][5:15] != 0).any()
    assert (g["exact"][15:40] == 0).all() and (g["exact"][:5] != 0).any()
    assert (g["amplified"][:5] == 0).all()


def test_forward_matches_reference_token_loss():
    model = build_model(get_preset("tiny-qwen3"), dtype=torch.float64, seed=5)
    ids, labels, kw = make_batch(seed=12, packed=True, padded=True)
    out = model(ids, labels=labels, **kw)
    ref, valid = reference_token_loss(model, ids, labels, **kw)
    assert torch.equal(out.valid, valid)
    assert torch.allclose(out.token_loss, ref, rtol=1e-12, atol=1e-12)
    # The last row of each document never carries a loss.
    last = out.plan.layout.last_rows()
    assert not (out.valid & last).any()


def test_bf16_autocast_step_runs_and_tracks_fp32():
    model = build_model(get_preset("tiny-gqa"), seed=6)
    ids, labels, _ = make_batch(seed=13)
    sel = Selector("loss", 0.5)
    out32 = model(ids, labels=labels)
    keep = sel(out32.token_loss, out32.valid)
    out32.plan.loss(out32.token_loss, keep).backward()
    g32 = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
        loss = out.plan.loss(out.token_loss, keep)
    loss.backward()
    g16 = grads(model)
    assert all(v.dtype == torch.float32 for v in g16.values())
    for name in g32:
        err = ((g16[name] - g32[name]).norm() / g32[name].norm()).item()
        assert err < 5e-2, f"{name}: {err:.3f}"


def test_model_input_errors():
    model = build_model(get_preset("tiny"), seed=0)
    ids = torch.randint(0, 512, (2, 8))
    with pytest.raises(ValueError, match="labels have shape"):
        model(ids, labels=ids[:, :7])
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        model(torch.zeros(1, 1025, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    windowed = build_model(dataclasses.replace(get_preset("tiny"), sliding_window=4), seed=0)
    with pytest.raises(ValueError, match="sliding window"):
        windowed(ids)
    out = model(ids, labels=torch.full_like(ids, -100))
    with pytest.raises(ValueError, match="no valid token"):
        Selector("loss", 0.5)(out.token_loss, out.valid)
