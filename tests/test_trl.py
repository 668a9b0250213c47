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

V = 64  # vocabulary: <pad>, <eos>, w0 .. w61


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


def first_step(trainer_cls, tmp_path, model=None, ds=None, peft_config=None, **kw):
    """(gradients of the first step, the trainer) for one SFT set-up."""
    extra = {k: kw.pop(k) for k in list(kw) if k in ("select", "ratio", "backward", "token_metrics",
                                                        "compute_loss_func")}
    grads = Grads()
    trainer = trainer_cls(
        model=model if model is not None else tiny_model(), args=config(tmp_path, **kw),
        train_dataset=ds if ds is not None else prompt_completion(), processing_class=tokenizer(),
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


@pytest.mark.parametrize("setup", SETUPS)
def test_rho_one_gives_sft_trainer_gradients(tmp_path, setup):
    kw = SETUPS[setup]
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", **kw)
    got, trainer = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    assert trainer.state.log_history[0]["kept_fraction"] == 1.0
    assert_same_grads(got, want, float32_head=True)


@pytest.mark.filterwarnings("ignore:`compute_loss_func` is deprecated:FutureWarning")
def test_rho_one_gives_float64_gradients(tmp_path):
    """To float64 rounding: SFTTrainer with transformers' loss on float64 logits."""
    kw = SETUPS["packing (padding-free)"]
    want, _ = first_step(trl.SFTTrainer, tmp_path / "trl", compute_loss_func=hf_loss, **kw)
    got, _ = first_step(CentrifugeSFTTrainer, tmp_path / "c", select="none", **kw)
    assert_same_grads(got, want)
