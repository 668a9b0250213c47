"""CentrifugeTrainer: accumulation-window normalization and a short converging run."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from centrifuge import BackwardOptions, CentrifugeTrainer, Selector, patch  # noqa: E402
from centrifuge.integrations import find_plan, patch_options, valid_rows  # noqa: E402

V = 17


def tiny_model(seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


class CountingTask(torch.utils.data.Dataset):
    """Rows count up by a per-row step mod V from a random start; the step is
    readable from the first two tokens, so the rest is learnable."""

    def __init__(self, n, L=16, seed=0, pad_every=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(L)) % V
        self.mask = torch.ones_like(self.ids)
        if pad_every:  # right padding of varying length: uneven micro-batches
            for i in range(0, n, pad_every):
                self.mask[i, L - 2 - i % 7 :] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return dict(input_ids=self.ids[i], attention_mask=self.mask[i], labels=labels)


def trainer_for(model, tmp_path, **kw):
    save_steps = kw.pop("save_steps", None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=kw.pop("max_steps", 1), learning_rate=kw.pop("lr", 1e-3), warmup_steps=0,
        logging_steps=10, save_strategy="steps" if save_steps else "no", save_steps=save_steps,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    return CentrifugeTrainer(model=model, args=args, **kw)


def test_window_loss_is_the_mean_over_all_kept_rows_of_the_window(tmp_path):
    ds = CountingTask(8, pad_every=1)
    model = tiny_model()
    plain = copy.deepcopy(model)
    trainer = trainer_for(model, tmp_path, select="loss", ratio=0.3, train_dataset=ds)
    micro = [transformers.default_data_collator([ds[i] for i in idx]) for idx in ([0, 1, 2], [3, 4])]
    window, K = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    model.train()
    losses = [trainer.compute_loss(model, b, num_items_in_batch=K) for b in window]
    assert all(find_plan(loss).keep is not None for loss in losses)  # the compact path ran
    total = sum(losses)
    # Independently: select on an unpatched copy, then one mean over the window.
    kept_sum, kept_n = 0.0, 0
    with torch.no_grad():
        for b in micro:
            logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], reduction="none")
            m = b["attention_mask"].bool()
            valid = (b["labels"][:, 1:] != -100) & m[:, :-1]
            keep = Selector("loss", 0.3)(tl, valid)
            kept_sum, kept_n = kept_sum + tl[keep].sum(), kept_n + int(keep.sum())
    assert int(K) == kept_n
    torch.testing.assert_close(total, kept_sum / kept_n, rtol=1e-5, atol=1e-6)
    # A per-micro-batch mean averaged over the window would differ here.
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    # The Trainer's own step must not rescale it (transformers 5.17 and 5.2x decide differently).
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = len(window)
    stepped = sum(trainer.training_step(model, dict(b), K) for b in window)
    torch.testing.assert_close(stepped, total.detach(), rtol=1e-6, atol=1e-7)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_reference_loss_column_reaches_rho1(tmp_path):
    ds = CountingTask(4)
    model = tiny_model()
    trainer = trainer_for(model, tmp_path, select="rho1", ratio=0.5, train_dataset=ds)
    trainer._set_signature_columns_if_needed()
    assert "reference_loss" in trainer._signature_columns
    b = transformers.default_data_collator([ds[i] for i in range(4)])
    model.train()
    with pytest.raises(ValueError, match="reference_model"):
        trainer.compute_loss(model, b)
    b["reference_loss"] = torch.rand(4, 15)
    trainer.compute_loss(model, b, num_items_in_batch=torch.tensor(30)).backward()


def test_short_trainer_run_converges(tmp_path):
    ds = CountingTask(64, seed=1)
    model = tiny_model(1)
    ref = tiny_model(2)  # a reference model: rho1 runs end to end
    trainer = trainer_for(
        model, tmp_path, select="rho1", ratio=0.5, reference_model=ref, train_dataset=ds,
        eval_dataset=CountingTask(16, seed=2), max_steps=25, lr=1e-2,
    )  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("method", ["loss", "random", "none"])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_row_counts_are_what_selection_keeps(method, granularity):
    from centrifuge.integrations import selective_loss, valid_rows
    from centrifuge.integrations.trainer import row_counts

    ds = CountingTask(6, pad_every=1, seed=3)
    b = transformers.default_data_collator([ds[i] for i in range(6)])
    logits = torch.randn(6, 16, V, requires_grad=True)
    sel = Selector(method, 0.37, granularity, seed=1)
    with pytest.warns(UserWarning, match="patched"):  # random logits: no patched forward
        _, keep = selective_loss(
            logits, b["labels"], sel, attention_mask=b["attention_mask"], return_keep=True
        )
    valid = valid_rows(b["labels"], b["attention_mask"])
    assert row_counts(sel, b) == (int(keep.sum()), int(valid.sum()))
    assert 0 < int(keep.sum()) <= int(valid.sum())


class RecordingSelector(Selector):
    """A selector that keeps every mask it returns."""

    def __post_init__(self):
        super().__post_init__()
        self.masks = []

    def __call__(self, *args, **kwargs):
        self.masks.append(super().__call__(*args, **kwargs))
        return self.masks[-1]


@pytest.mark.parametrize("seed", [None, 3])  # torch's default generator, the selector's own
def test_resume_continues_the_random_selection(tmp_path, seed):
    ds = CountingTask(32, seed=5)
    masks = {}
    for run, resume in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoint-2")):
        selector = RecordingSelector("random", 0.5, seed=seed)
        trainer = trainer_for(tiny_model(1), tmp_path / run, selector=selector, train_dataset=ds,
                              max_steps=4, save_steps=2)  # fmt: skip
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        masks[run] = selector.masks
    straight, resumed = masks["straight"], masks["resumed"]
    assert len(straight) == 8 and len(resumed) == 4  # 4 steps x 2 micro-batches
    assert all(not torch.equal(a, b) for a, b in zip(straight, straight[1:]))
    assert all(map(torch.equal, straight[4:], resumed))


def test_hidden_states_in_the_config_keep_the_fused_path(tmp_path):
    """The Trainer passes the labels into the model (fused norm + LM head +
    cross-entropy, no logits), and asks for no hidden states: a config that
    asks for them (a direct call then runs the logits path) trains the same
    weights (float64: Adam magnifies rounding in near-zero gradients)."""
    ds = CountingTask(16, seed=4, pad_every=3)
    ref = tiny_model(2).double()
    weights = []
    for hidden in (False, True):
        model = tiny_model(1).double()
        model.config.output_hidden_states = hidden
        trainer = trainer_for(model, tmp_path, select="rho1", ratio=0.5, reference_model=ref,
                              train_dataset=ds, max_steps=3, lr=1e-2)  # fmt: skip
        b = transformers.default_data_collator([ds[i] for i in range(2)])
        model.train()
        fused = getattr(model(**b), "token_loss", None) is not None
        assert fused is not hidden
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, w in weights[0].items():
        torch.testing.assert_close(w, weights[1][n], rtol=1e-9, atol=1e-10, msg=n)


def test_backward_options_survive_what_the_trainer_wraps(tmp_path):
    """A model patched with options keeps them; other options given to the
    trainer are refused."""
    opts = BackwardOptions(exact_layers=1)
    trainer = trainer_for(patch(tiny_model(), backward=opts), tmp_path, train_dataset=CountingTask(8))
    assert patch_options(trainer.model)["backward"] is opts
    with pytest.raises(ValueError, match="backward= options"):
        trainer_for(patch(tiny_model(), backward=opts), tmp_path, train_dataset=CountingTask(8),
                    backward=BackwardOptions(extra=0.5))  # fmt: skip
    trainer = trainer_for(tiny_model(), tmp_path, train_dataset=CountingTask(8), backward=opts)
    assert patch_options(trainer.model)["backward"] is opts


def test_liger_kernels_go_under_the_patch(tmp_path, monkeypatch):
    """use_liger_kernel: transformers would bind Liger's forwards in train(), over
    the patch; the trainer applies them under it, and the options stay."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger rewrites the module
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    opts = BackwardOptions(exact_layers=1)
    model = patch(tiny_model(), backward=opts)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_liger_kernel=True, use_cpu=True,
                                          report_to=[], max_steps=1, save_strategy="no")  # fmt: skip
    with pytest.warns(UserWarning, match="Liger-Kernel"):
        trainer = CentrifugeTrainer(model=model, args=args, train_dataset=CountingTask(8))
    assert patch_options(trainer.model)["backward"] is opts
    trainer.train()  # the patched forward runs (bypassed, the decoder layers would raise)


def test_label_smoothing_and_compute_loss_func_are_refused(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True,
                                          report_to=[])  # fmt: skip
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        CentrifugeTrainer(model=tiny_model(), args=args, train_dataset=CountingTask(8))
    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer_for(tiny_model(), tmp_path, train_dataset=CountingTask(8), compute_loss_func=lambda *a, **k: 0)


def test_kept_loss_hook_gets_the_window_count(tmp_path):
    """A loss written in kept_loss (here: kept rows weighted by position) is
    normalized by the window's kept count, not doubled under accumulation."""
    ds = CountingTask(8, pad_every=1)

    class Weighted(CentrifugeTrainer):
        def kept_loss(self, token_loss, keep, num_kept, inputs):
            self.counts = getattr(self, "counts", []) + [int(num_kept)]
            w = torch.linspace(1, 2, token_loss.shape[1], dtype=token_loss.dtype)
            return (token_loss * keep * w).sum() / num_kept

    model = tiny_model().double()
    plain = patch(copy.deepcopy(model))
    trainer = trainer_for(model, tmp_path, select="loss", ratio=0.5, train_dataset=ds)
    trainer.__class__ = Weighted
    micro = [transformers.default_data_collator([ds[i] for i in idx]) for idx in ([0, 1, 2, 3], [4, 5, 6, 7])]
    window, K = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    stepped = sum(trainer.training_step(model, dict(b), K) for b in window)
    assert trainer.counts == [int(K)] * 2
    # The same by hand: select, weight, one mean over the window's kept rows.
    total = 0
    for b in micro:
        out = plain(**b)
        keep = Selector("loss", 0.5)(out.token_loss.detach(), out.valid)
        w = torch.linspace(1, 2, out.token_loss.shape[1], dtype=torch.float64)
        centrifuge_loss = (out.token_loss * keep * w).sum() / int(K)
        find_plan(out.token_loss).fill(keep)
        centrifuge_loss.backward()
        total = total + centrifuge_loss.detach()
    torch.testing.assert_close(stepped, total, rtol=1e-12, atol=0)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_kept_fraction_and_kept_tokens_are_logged(tmp_path):
    trainer = trainer_for(tiny_model(), tmp_path, select="loss", ratio=0.3, train_dataset=CountingTask(16, pad_every=1),
                          max_steps=2)  # fmt: skip
    trainer.args.logging_steps = 1
    windows, get = [], trainer.get_batch_samples

    def recorded(*args):
        batches, K = get(*args)
        windows.append(batches)
        return batches, K

    trainer.get_batch_samples = recorded
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    valid = [[valid_rows(b["labels"], b["attention_mask"]) for b in w] for w in windows]
    kept = [sum(Selector("loss", 0.3).count(v) for v in w) for w in valid]
    assert [h["kept_tokens"] for h in logs] == [kept[0], kept[0] + kept[1]]
    for h, k, w in zip(logs, kept, valid):
        assert h["kept_fraction"] == pytest.approx(k / sum(int(v.sum()) for v in w))
