"""The dense path of the amplified backward (``BackwardOptions(path="dense")``):
full-size GEMMs with the filtered rows' K/V gradients zeroed instead of gathered
kept rows. Held in float64 to the reference semantics (the same gradients as the
compact path), on the native model and on a patched transformers model; and the
``auto`` choice between the two."""

import pytest
import torch
import torch.nn.functional as F

import centrifuge.plan as plan_module
from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss
from centrifuge.plan import BackwardOptions
from centrifuge.selection import Selector
from test_model_grads import assert_close, grads, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("exact_layers", [0, 1])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "checkpointed"])
def test_dense_path_matches_reference_semantics(name, exact_layers, recompute):
    model = build_model(get_preset(name), dtype=torch.float64, seed=3)
    if recompute:
        model.activation_checkpointing_enable()
    ids, labels, kw = make_batch(seed=len(name) + exact_layers, packed=True, padded=True)
    opts = BackwardOptions(path="dense", exact_layers=exact_layers)
    out = model(ids, labels=labels, backward=opts, **kw)
    keep = Selector("loss", 0.4)(out.token_loss, out.valid)
    out.plan.loss(out.token_loss, keep).backward()
    assert not out.plan.compact and out.plan.kv_mask is not None  # nothing gathered
    ours = grads(model)
    reference_filtered_loss(model, ids, labels, keep, exact_layers=exact_layers, **kw).backward()
    assert_close(ours, grads(model))


@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_dense_path_on_a_patched_transformers_model(kind):
    pytest.importorskip("transformers")
    from test_hf_patch import batch, make_model, reference_loss

    from centrifuge import filtered_loss, patch
    from centrifuge.integrations import find_plan

    model = make_model("llama", 2)
    ids, kw, keep = batch(kind, seed=4)
    want_loss, want = reference_loss(model, ids, keep, **kw)
    patch(model, backward=BackwardOptions(path="dense"))
    logits = model(ids, **kw).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = filtered_loss(token_loss, keep[:, :-1])
    plan = find_plan(token_loss)
    assert plan.path == "dense" and not plan.compact
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_auto_chooses_by_work_per_layer_on_gpus(monkeypatch):
    monkeypatch.setattr(plan_module, "COMPACT_MIN_WORK", 1e6)
    auto = BackwardOptions()
    assert auto.choose_path(1000, 999, "cuda") == "dense"
    assert auto.choose_path(1000, 1000, "cuda") == "compact"
    assert auto.choose_path(1000, 999, "cpu") == "compact"  # no launch-bound steps on the CPU
    assert BackwardOptions(extra=0.2).choose_path(10, 10, "cuda") == "compact"  # sampled rows
    assert BackwardOptions(path="dense").choose_path(10**9, 10**9, "cuda") == "dense"
    assert BackwardOptions(path="compact").choose_path(1, 1, "cuda") == "compact"


def test_models_ask_for_their_path_with_tokens_and_layer_size(monkeypatch):
    asked = []

    def choose(self, tokens, layer_params, device_type="cuda"):
        asked.append((tokens, layer_params, device_type))
        return "dense"

    monkeypatch.setattr(BackwardOptions, "choose_path", choose)
    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=0)
    ids, labels, _ = make_batch(seed=0)
    assert model(ids, labels=labels).plan.path == "dense"
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert asked == [(ids.numel(), layer, "cpu")] and layer == model.config.layer_parameters()
    pytest.importorskip("transformers")
    from test_hf_patch import make_model

    from centrifuge import patch
    from centrifuge.integrations import find_plan

    hf = patch(make_model("llama", 2))
    logits = hf(ids % 61).logits
    assert find_plan(logits).path == "dense"
    assert asked[-1] == (ids.numel(), sum(p.numel() for p in hf.model.layers[0].parameters()), "cpu")


def test_path_errors_and_parsing():
    with pytest.raises(ValueError, match="backward path must be one of"):
        BackwardOptions(path="sparse")
    with pytest.raises(ValueError, match="needs path 'compact'"):
        BackwardOptions(extra=0.3, path="dense")
    with pytest.raises(ValueError, match="amplified backward only"):
        BackwardOptions("exact", path="dense")
    opts = BackwardOptions.parse("exact_layers=1,path=dense")
    assert (opts.path, opts.exact_layers) == ("dense", 1)
    assert opts.describe() == "amplified+exact1+dense"
