"""PEFT LoRA adapters and frozen weights in the compact layer, in float64 on CPU:
gradients against the reference semantics (plain autograd through peft's own
modules, K/V of filtered rows detached), on the native model and on real
transformers classes (patched before or after peft wraps them, with and without
activation checkpointing); lora_dropout against peft's own modules run from the
same seed (the same masks); frozen weights get no gradient and cost no
weight-gradient GEMM; merge_and_unload and saving; clear errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_hf_checkpointing import enable_checkpointing  # noqa: E402
from test_hf_patch import batch, make_model, reference_loss  # noqa: E402
from test_model_grads import make_batch  # noqa: E402

from centrifuge import filtered_loss, patch, unpatch  # noqa: E402
from centrifuge.integrations import is_patched  # noqa: E402
from centrifuge.models import build_model, get_preset  # noqa: E402
from centrifuge.models.reference import reference_filtered_loss, reference_token_loss  # noqa: E402
from centrifuge.plan import BackwardOptions  # noqa: E402
from centrifuge.selection import Selector  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, **kw):
    # init_lora_weights=False: B random too (peft's default B = 0 would make dA zero).
    cfg = dict(r=3, lora_alpha=7, target_modules=TARGETS, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def trainable_grads(model):
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)
    return grads


def unpatched_reference(model, ids, keep, **kw):
    """reference_loss of an unpatched copy (a deep copy of a patched model is patched)."""
    return reference_loss(unpatch(copy.deepcopy(model)), ids, keep, **kw)


def hf_step(model, ids, kw, keep):
    logits = model(input_ids=ids, **kw).logits
    tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = filtered_loss(tl, keep[:, :-1])
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("order", ["peft-then-patch", "patch-then-peft"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_lora_grads_match_reference(family, order, checkpointing):
    ids, kw, keep = batch("packing" if family == "qwen2" else "padding", seed=8)
    model = make_model(family, 2)
    if order == "patch-then-peft":
        patch(model)
    pm = lora(model)
    if order == "peft-then-patch":
        assert patch(pm) is pm and is_patched(pm)
    if checkpointing:
        enable_checkpointing(pm)
    loss = hf_step(pm, ids, kw, keep)
    got = trainable_grads(pm.get_base_model())
    assert len(got) == 2 * len(TARGETS) * 2  # A and B of every projection of both layers
    # The reference: the same peft modules through plain autograd on an unpatched copy.
    want_loss, want = unpatched_reference(pm.get_base_model(), ids, keep, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("knobs", [{}, dict(kv_projections=True), dict(kv_projections=True, path="dense")],
                         ids=["amplified", "kv_projections", "kv_projections-dense"])  # fmt: skip
def test_native_lora_and_frozen_weights_match_reference(knobs):
    """kv_projections: the filtered rows' K/V gradients reach the K/V adapters too."""
    model = build_model(get_preset("tiny-qwen3"), dtype=torch.float64, seed=2)
    pm = lora(model)
    base = pm.get_base_model()
    base.model.layers[1].mlp.down_proj.base_layer.weight.requires_grad_(True)  # a trainable base
    ids, labels, kw = make_batch(seed=4, packed=True)
    for recompute in (False, True):
        (base.activation_checkpointing_enable if recompute else base.activation_checkpointing_disable)()
        out = base(ids, labels=labels, backward=BackwardOptions(**knobs), **kw)
        keep = Selector("loss", 0.4)(out.token_loss, out.valid)
        out.plan.loss(out.token_loss, keep).backward()
        got = trainable_grads(base)
        reference_filtered_loss(base, ids, labels, keep, kv_projections=bool(knobs), **kw).backward()
        want = trainable_grads(base)
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("path", ["compact", "dense"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_lora_dropout_matches_peft(path, checkpointing):
    """lora_dropout=0.1 in training: the patched model draws peft's masks (same
    generator, same order, same op), so its gradients equal those of peft's own
    modules through plain autograd on an unpatched copy run from the same seed,
    on the compact plan and the dense path, with and without checkpointing (the
    recompute regenerates the masks)."""
    ids, kw, keep = batch("padding", seed=5)
    pm = lora(make_model("qwen2", 2), lora_dropout=0.1)
    patch(pm, backward=BackwardOptions(path=path))
    if checkpointing:
        enable_checkpointing(pm)
    base = pm.get_base_model()
    results = {}
    for seed in (3, 4):
        torch.manual_seed(seed)
        loss = hf_step(pm, ids, kw, keep)
        got, state = trainable_grads(base), torch.get_rng_state()
        torch.manual_seed(seed)
        want_loss, want = unpatched_reference(base, ids, keep, **kw)
        assert torch.equal(state, torch.get_rng_state())  # the same draws were made
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)
        results[seed] = got
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.allclose(results[3][name], results[4][name])  # the masks matter


@pytest.mark.parametrize("backward", ["amplified", "exact", "kv_projections"])
def test_native_lora_dropout_matches_peft(backward):
    """The native model under peft with lora_dropout=0.1: gradients equal plain
    autograd through peft's modules run from the same seed, on a compact
    (amplified; with kv_projections the filtered rows' K/V adapter gradients use
    the forward's masks too) and a dense (exact) plan, with and without recompute."""
    kv_projections = backward == "kv_projections"
    if kv_projections:
        backward = BackwardOptions(kv_projections=True)
    pm = lora(build_model(get_preset("tiny-qwen3"), dtype=torch.float64, seed=2), lora_dropout=0.1)
    base = pm.get_base_model()
    ids, labels, kw = make_batch(seed=6, packed=True)
    for recompute in (False, True):
        (base.activation_checkpointing_enable if recompute else base.activation_checkpointing_disable)()
        torch.manual_seed(7)
        out = base(ids, labels=labels, backward=backward, **kw)
        keep = Selector("random", 0.4, seed=1)(out.token_loss, out.valid)
        out.plan.loss(out.token_loss, keep).backward()
        got = trainable_grads(base)
        torch.manual_seed(7)
        if backward == "exact":  # the masked loss: nothing detached
            token_loss, _ = reference_token_loss(base, ids, labels, None, **kw)
            ((token_loss * keep).sum() / keep.sum()).backward()
        else:
            reference_filtered_loss(base, ids, labels, keep, kv_projections=kv_projections, **kw).backward()
        want = trainable_grads(base)
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_lora_dropout_is_off_in_eval_mode():
    """In eval mode (still with gradients) nothing is dropped and no random
    number is drawn: the gradients are those of the same adapters without
    dropout."""
    ids, kw, keep = batch("packing", seed=2)
    pm = patch(lora(make_model("llama", 2), lora_dropout=0.1)).eval()
    state = torch.get_rng_state()
    hf_step(pm, ids, kw, keep)
    assert torch.equal(state, torch.get_rng_state())
    got = trainable_grads(pm.get_base_model())
    plain = patch(lora(make_model("llama", 2))).train()  # the same weights, lora_dropout=0
    hf_step(plain, ids, kw, keep)
    want = trainable_grads(plain.get_base_model())
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-14, msg=name)


def _backward_flops(model, ids, keep):
    out = model(ids, labels=ids)
    loss = out.plan.loss(out.token_loss, keep)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def test_frozen_weights_cost_no_weight_gradient_gemm():
    """Freezing every projection removes exactly their dW GEMMs from the backward,
    freezing the LM head its dW GEMM."""
    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 1:40:2] = True
    full = _backward_flops(model, ids, keep)
    model.zero_grad(set_to_none=True)
    c, n = model.config, int(keep.sum())
    d, F_, qkv = c.hidden_size, c.intermediate_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    dw = 2 * n * d * (qkv + c.num_heads * c.head_dim + 3 * F_) * c.num_layers  # dW of the projections
    for layer in model.model.layers:
        for block, name in [("self_attn", p) for p in TARGETS[:4]] + [("mlp", p) for p in TARGETS[4:]]:
            getattr(getattr(layer, block), name).weight.requires_grad_(False)
    frozen = _backward_flops(model, ids, keep)
    assert full - frozen == dw
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.requires_grad_(False)  # the LM head's dW: 2 n d V more
    assert frozen - _backward_flops(model, ids, keep) == 2 * n * d * c.vocab_size
    assert model.lm_head.weight.grad is None
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.weight.grad is None and layer.mlp.down_proj.weight.grad is None
        assert layer.input_layernorm.weight.grad is not None


def test_merge_and_unload_and_saving(tmp_path):
    model = make_model("llama", 2)
    pm = patch(lora(model))
    ids, kw, keep = batch("padding", seed=9)
    hf_step(pm, ids, kw, keep)
    pm.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = pm(input_ids=ids, **kw).logits
    pm.save_pretrained(tmp_path / "adapter")
    saved = peft.PeftModel.from_pretrained(make_model("llama", 2), tmp_path / "adapter")
    for (n, p), (m, q) in zip(
        pm.named_parameters(), saved.named_parameters()
    ):  # the adapters round-trip as with an unpatched model
        assert n == m and torch.equal(p, q), n
    merged = pm.merge_and_unload()
    assert is_patched(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, **kw).logits, before, rtol=1e-10, atol=1e-10)
    merged.requires_grad_(True)  # merged: plain nn.Linear projections again, all trainable
    hf_step(merged, ids, kw, keep)
    got = {n: p.grad for n, p in merged.named_parameters()}
    _, want = unpatched_reference(merged, ids, keep, **kw)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_unsupported_lora_settings_raise_clear_errors():
    ids = torch.randint(0, 61, (2, 9))
    cases = [
        (dict(use_dora=True), NotImplementedError, "DoRA"),
        (dict(lora_bias=True), NotImplementedError, "bias"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout must be below 1"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):  # at patch time (peft trains)
            patch(lora(make_model("llama", 2), **extra))
    pm = lora(make_model("llama", 2))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match="several active LoRA adapters"):
        patch(pm)
    # Dropout is inactive in eval mode: no error then, and one at the call in training mode.
    pm = patch(lora(make_model("llama", 2), lora_dropout=1.0).eval())
    pm(input_ids=ids)
    with pytest.raises(ValueError, match="lora_dropout"):
        pm.train()(input_ids=ids)

    class Quantized(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    model = make_model("llama", 2)
    q = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = Quantized(q.in_features, q.out_features, bias=False)
    with pytest.raises(TypeError, match="decoder layer 0: self_attn.q_proj is a Quantized"):
        patch(model)
    model = make_model("llama", 2)
    pm = lora(model)
    q = model.model.layers[0].self_attn.q_proj
    q.base_layer = Quantized(q.in_features, q.out_features, bias=False)
    with pytest.raises(TypeError, match="LoRA around a Quantized"):
        patch(pm)


def test_trainer_with_peft_lora_and_gradient_checkpointing(tmp_path, monkeypatch):
    """The usual fine-tuning set-up: CentrifugeTrainer on a PeftModel with
    gradient_checkpointing=True. Only the adapters move; the layers recompute on
    kept rows."""
    pytest.importorskip("accelerate")
    import transformers
    from test_hf_trainer import CountingTask, tiny_model

    from centrifuge.integrations.trainer import CentrifugeTrainer
    from centrifuge.models import layer as layer_mod

    recomputed = []
    original = layer_mod.attention_forward_rows
    monkeypatch.setattr(
        layer_mod, "attention_forward_rows", lambda *a: recomputed.append(1) or original(*a)
    )
    pm = lora(tiny_model())
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        gradient_checkpointing=True, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = CentrifugeTrainer(model=pm, args=args, train_dataset=CountingTask(8), ratio=0.5)
    trainer.train()
    assert is_patched(pm) and len(recomputed) == 2 * 2  # 2 steps x 2 layers
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n


def test_a_repeated_dropout_mask_that_differs_fails_loudly():
    """The backward repeats the forward's draw from the saved generator state; a
    state that does not reproduce it (another generator's) fails a device assert."""
    from centrifuge.models.layer import AdapterDropout

    torch.manual_seed(0)  # fixed draws: the two kept counts below differ
    x = torch.ones(16, 8, dtype=torch.float64)
    drop = AdapterDropout({"wq": 0.5})
    first = drop.noise("wq", x)
    assert torch.equal(drop.noise("wq", x), first)  # repeated: the same mask
    assert torch.equal(drop.noise("wq", x, torch.tensor([3, 5])), first[[3, 5]])
    state, shape, kept = drop.states["wq"]
    torch.manual_seed(12345)
    drop.states["wq"] = (torch.get_rng_state(), shape, kept)
    with pytest.raises(RuntimeError, match="repeated mask differs"):
        drop.noise("wq", x)
