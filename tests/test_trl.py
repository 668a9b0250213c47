"""CentrifugeSFTTrainer against TRL's own SFTTrainer (tiny Llama, float64, CPU)."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import centrifuge  # noqa: E402
from centrifuge import BackwardOptions, CentrifugeSFTTrainer, Selector  # noqa: E402
from centrifuge.integrations import patch_options  # noqa: E402
from centrifuge.integrations.hf import valid_rows  # noqa: E402
from test_hf_patch import exact_copy  # noqa: E402

V = 64  # vocabulary: <pad>, <eos>, w0 .. w61
README = Path(__file__).parents[1] / "README.md"


def tokenizer():
    """A word-level tokenizer over w0 .. w61, built in memory (no downloads)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double()


def prompt_completion(n=8, seed=0):
    """Tokenized prompt-completion rows of uneven lengths (TRL's processed form)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, c = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((3, 8), (2, 7)))
        ids = torch.randint(2, V, (p + c,), generator=g).tolist()
        rows.append(dict(input_ids=ids + [1], completion_mask=[0] * p + [1] * (c + 1)))
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0, bf16=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, shuffle_dataset=False,
        gradient_checkpointing=False, completion_only_loss=False, dataloader_drop_last=True,
    )  # fmt: skip
    return trl.SFTConfig(**{**base, **kw})


class Grads(transformers.TrainerCallback):
    """The gradients of the first optimizer step (clipping is off)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def first_step(trainer_cls, tmp_path, model=None, ds=None, peft_config=None, tok=None, **kw):
    """(gradients of the first step, the trainer) for one SFT set-up."""
    extra = {k: kw.pop(k) for k in list(kw) if k in ("select", "ratio", "backward", "token_metrics",
                                                        "compute_loss_func")}
    grads = Grads()
    trainer = trainer_cls(
        model=model if model is not None else tiny_model(), args=config(tmp_path, **kw),
        train_dataset=ds if ds is not None else prompt_completion(),
        processing_class=tok if tok is not None else tokenizer(),
        callbacks=[grads], peft_config=peft_config, **extra,
    )  # fmt: skip
    trainer.train()
    return grads.grads, trainer


def assert_same_grads(got, want, float32_head=False):
    """float32_head: ``want`` comes from TRL's fused LM head, which takes the logits
    in float32 tiles whatever the model's dtype (about 1e-7 of each gradient)."""
    assert got.keys() == want.keys()
    for n in want:
        rtol, atol = (1e-5, 2e-6 * float(want[n].abs().max())) if float32_head else (1e-9, 1e-12)
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def hf_loss(outputs, labels, num_items_in_batch):
    """transformers' causal LM loss from the float64 logits (TRL's custom-loss path)."""
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum") / num_items_in_batch


# ρ = 1 must give SFTTrainer's gradients. With completion-only labels the prompt
# rows are context rows (no loss, real tokens): their K/V stay in the backward.
SETUPS = {
    "full labels": {},
    "completion only": dict(completion_only_loss=True),
    "packing (padding-free)": dict(completion_only_loss=True, packing=True, max_length=24),
    "gradient checkpointing": dict(completion_only_loss=True, gradient_checkpointing=True),
    "full labels, packing": dict(packing=True, max_length=24),
}


# A chat template whose assistant turns are marked for TRL's assistant_only_loss.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }} <eos> {% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
)


def chats(n=8, seed=0):
    """Conversations user, assistant, user, assistant of 2-4 words a turn."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        turns = []
        for role in ("user", "assistant", "user", "assistant"):
            k = int(torch.randint(2, 5, (1,), generator=g))
            words = " ".join(f"w{int(i)}" for i in torch.randint(0, V - 2, (k,), generator=g))
            turns.append(dict(role=role, content=words))
        rows.append(dict(messages=turns))
    return datasets.Dataset.from_list(rows)


def test_assistant_only_loss_gives_sft_trainer_gradients(tmp_path):
    """TRL's assistant-only loss labels the user turns -100; the second user turn
    sits between labelled rows, so context rows are inside the conversation."""
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    kw = dict(ds=chats(), tok=tok, assistant_only_loss=True)
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", **kw)
    got, trainer = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    labels = torch.tensor(trainer.train_dataset[0]["labels"])
    ignored = (labels == -100).nonzero().squeeze(1)
    assert ignored.numel() and int(ignored.max()) > int((labels != -100).nonzero().min())
    assert_same_grads(got, want, float32_head=True)


@pytest.mark.parametrize("setup", SETUPS)
def test_rho_one_gives_sft_trainer_gradients(tmp_path, setup):
    kw = SETUPS[setup]
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", **kw)
    got, trainer = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    assert trainer.state.log_history[0]["kept_fraction"] == 1.0
    assert_same_grads(got, want, float32_head=True)


@pytest.mark.filterwarnings("ignore:`compute_loss_func` is deprecated:FutureWarning")
def test_rho_one_gives_float64_gradients(tmp_path):
    """To float64 rounding: SFTTrainer with transformers' loss on float64 logits
    (TRL's custom-loss path) and RMSNorms kept in float64 (transformers' own round
    to float32 even in a float64 model)."""
    kw = SETUPS["packing (padding-free)"]
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", model=exact_copy(tiny_model()),
                         compute_loss_func=hf_loss, **kw)  # fmt: skip
    got, _ = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    assert_same_grads(got, want)


def test_rho_one_with_peft_config(tmp_path):
    """LoRA through SFTTrainer's peft_config (random A and B: every adapter gets gradient)."""
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    kw = dict(completion_only_loss=True, gradient_checkpointing=True)
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", peft_config=peft.LoraConfig(**lora), **kw)
    got, trainer = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none",
                              peft_config=peft.LoraConfig(**lora), **kw)  # fmt: skip
    assert isinstance(trainer.model, peft.PeftModel) and centrifuge.integrations.is_patched(trainer.model)
    assert want and all("lora_" in n for n in want)
    assert_same_grads(got, want, float32_head=True)


class Recorder(CentrifugeSFTTrainer):
    """Keeps the training micro-batches it is given."""

    def compute_loss(self, model, inputs, *args, **kw):
        if model.training:
            self.seen = getattr(self, "seen", []) + [{k: v for k, v in inputs.items()}]
        return super().compute_loss(model, inputs, *args, **kw)


@pytest.mark.parametrize("packing", [False, True])
def test_selection_is_the_mean_over_the_window_kept_rows(tmp_path, packing):
    """ratio 0.5: the logged loss is the mean over every row kept in the window's
    two micro-batches (selected on an unpatched copy), and the gradients are the
    plain loop's: filtered_loss per micro-batch over the window's kept count."""
    kw = dict(completion_only_loss=True, select="loss", ratio=0.5)
    if packing:
        kw.update(packing=True, max_length=24, per_device_train_batch_size=1)
    model = tiny_model()
    plain = copy.deepcopy(model)
    got, trainer = first_step(Recorder, tmp_path, model=model, **kw)
    sel = Selector("loss", 0.5)
    kept_sum, kept_n, valid_n, keeps = 0.0, 0, 0, []
    with torch.no_grad():
        for b in trainer.seen:
            # TRL's kwargs; without a cache transformers isolates packed documents
            logits = plain(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits
            tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], reduction="none")
            valid = valid_rows(b["labels"], b.get("attention_mask"), b.get("position_ids"))[:, :-1]
            keep = sel(tl, valid)
            kept_sum, kept_n, valid_n = kept_sum + tl[keep].sum(), kept_n + int(keep.sum()), valid_n + int(valid.sum())
            keeps.append(keep)
    assert len(trainer.seen) == 2 and 0 < kept_n < valid_n
    log = trainer.state.log_history[0]
    assert log["kept_tokens"] == kept_n and log["kept_fraction"] == pytest.approx(kept_n / valid_n)
    assert log["loss"] == pytest.approx(float(kept_sum / kept_n), rel=1e-4)  # logged rounded
    # The gradients: the README's plain loop on a patched copy.
    loop = centrifuge.patch(copy.deepcopy(plain))
    for b, keep in zip(trainer.seen, keeps):
        model_kw = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}
        out = loop(input_ids=b["input_ids"], labels=b["labels"], **model_kw)
        centrifuge.filtered_loss(out.token_loss[:, :-1], keep, num_items=kept_n).backward()
    assert_same_grads(got, {n: p.grad for n, p in loop.named_parameters()})


def test_a_patched_model_under_plain_sft_trainer_raises(tmp_path):
    """TRL's fused LM head calls the backbone itself: patched before SFTTrainer, the
    patch would be bypassed; patched after, TRL's loss call is refused."""
    trainer = trl.SFTTrainer(model=centrifuge.patch(tiny_model()), args=config(tmp_path),
                             train_dataset=prompt_completion(), processing_class=tokenizer())  # fmt: skip
    with pytest.raises(RuntimeError, match="bypasses centrifuge.patch"):
        trainer.train()
    trainer = trl.SFTTrainer(model=tiny_model(), args=config(tmp_path), train_dataset=prompt_completion(),
                             processing_class=tokenizer())  # fmt: skip
    centrifuge.patch(trainer.model)
    with pytest.raises(ValueError, match="CentrifugeSFTTrainer"):
        trainer.train()


def test_backward_options_are_kept_or_refused(tmp_path):
    def build(model, **kw):
        return CentrifugeSFTTrainer(model=model, args=config(tmp_path), train_dataset=prompt_completion(),
                                    processing_class=tokenizer(), **kw)  # fmt: skip

    opts = BackwardOptions(exact_layers=1)
    trainer = build(centrifuge.patch(tiny_model(), backward=opts, check_rows=False))
    assert patch_options(trainer.model) == {"check_rows": False, "backward": opts}
    trainer = build(centrifuge.patch(tiny_model(), backward=opts), backward=BackwardOptions(exact_layers=1))
    assert patch_options(trainer.model)["backward"] is opts
    with pytest.raises(ValueError, match="backward= options"):
        build(centrifuge.patch(tiny_model(), backward=opts), backward=BackwardOptions(extra=0.5))
    trainer = build(tiny_model(), backward=opts)
    assert patch_options(trainer.model)["backward"] is opts


@pytest.mark.parametrize("option", ["label_smoothing_factor", "compute_loss_func"])
def test_loss_options_it_cannot_honour_are_refused(tmp_path, option):
    kw = {"label_smoothing_factor": 0.1} if option == "label_smoothing_factor" else {"compute_loss_func": hf_loss}
    with pytest.raises(ValueError, match=option), pytest.warns(FutureWarning):
        first_step(CentrifugeSFTTrainer, tmp_path, **kw)


def test_dft_loss_at_rho_one_is_trl_dft(tmp_path):
    kw = dict(completion_only_loss=True, loss_type="dft")
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", **kw)
    got, _ = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    assert_same_grads(got, want, float32_head=True)


def test_trl_metrics_are_kept(tmp_path):
    """entropy, mean_token_accuracy and num_tokens as TRL logs them (two steps, GA 2,
    logged every step), plus kept_fraction and kept_tokens."""
    kw = dict(completion_only_loss=True, max_steps=2, learning_rate=0.0)
    _, plain = first_step(trl.SFTTrainer, tmp_path / "trl", **kw)
    _, ours = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="loss", ratio=0.5, **kw)
    _, quiet = first_step(CentrifugeSFTTrainer, tmp_path / "q", select="loss", ratio=0.5, token_metrics=False, **kw)
    want, got, without = (t.state.log_history[:2] for t in (plain, ours, quiet))
    for w, g, q in zip(want, got, without):
        for key in ("entropy", "mean_token_accuracy", "num_tokens"):
            assert g[key] == pytest.approx(w[key], rel=1e-6), key
        assert 0.4 < g["kept_fraction"] < 0.7 and "entropy" not in q and q["num_tokens"] == w["num_tokens"]
    assert 0 < got[0]["kept_tokens"] < got[1]["kept_tokens"]


def test_imports():
    from centrifuge import CentrifugeTrainer
    from centrifuge.integrations.trainer import CentrifugeTrainer as T
    from centrifuge.integrations.trl import CentrifugeSFTTrainer as S

    assert CentrifugeTrainer is T and CentrifugeSFTTrainer is S
    assert issubclass(S, trl.SFTTrainer) and issubclass(T, transformers.Trainer)


def test_readme_recipe_runs(tmp_path, monkeypatch):
    """The README's TRL recipe, as written, on a tiny Qwen2 saved locally in place of the hub name."""
    tokenizers = pytest.importorskip("tokenizers")
    block = re.search(r"```python\n(import torch\nfrom datasets import Dataset\n.*?)```", README.read_text(), re.S).group(1)
    name = '"Qwen/Qwen2.5-0.5B"'
    assert name in block
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: 17 + 25 = ?\nAnswer: 42"], trainer)
    local = tmp_path / "model"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(local)
    cfg = transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block.replace(name, repr(str(local))), scope)
    logs = scope["trainer"].state.log_history
    assert scope["trainer"].state.global_step == 2 and 0 < logs[-1]["train_loss"] < 10


def test_ddp_and_fsdp2_give_the_single_process_gradients(tmp_path):
    """torchrun, 2 CPU processes, one micro-batch each: the kept count is summed
    over both, so DDP and FSDP2 give one process's gradients with 2 micro-batches."""
    from test_distributed import N, failed, launch

    worker = Path(__file__).parent / "distributed" / "trl_worker.py"
    for mode in ("ddp", "fsdp"):
        proc = launch(worker, mode, str(tmp_path / f"{mode}.pt"), timeout=400)
        assert proc.returncode == 0, failed(proc)
    assert N == 2
    import subprocess
    import sys

    single = subprocess.run([sys.executable, str(worker), "single", str(tmp_path / "single.pt")],
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    want = torch.load(tmp_path / "single.pt")
    for mode in ("ddp", "fsdp"):
        assert_same_grads(torch.load(tmp_path / f"{mode}.pt"), want)
