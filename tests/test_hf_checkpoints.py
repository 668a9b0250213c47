"""The native model loads and saves Hugging Face checkpoints and computes what
transformers computes on the same weights."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from centrifuge.models import LlamaForCausalLM, build_model, get_preset
from centrifuge.models.config import ModelConfig


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-qwen2", "tiny-qwen3", "mistral"])
def test_native_checkpoint_loads_in_transformers_with_same_losses(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    if name == "mistral":
        config = dataclasses.replace(get_preset("tiny-gqa"), family="mistral", rope_scaling=None)
    else:
        config = get_preset(name)
    # float32: HF's RMSNorm computes in float32 even for float64 models.
    model = build_model(config, dtype=torch.float32, seed=0)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    assert type(hf).__name__ == ModelConfig._HF_ARCH[model.config.family]
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([list(range(21)), list(range(9)) + list(range(12))])
    with torch.no_grad():
        ours = model.logits(ids)
        theirs = hf(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        # Per-token loss (row t predicts t+1) equals HF's logits + cross-entropy.
        out = model(ids, labels=ids)
        hf_loss = F.cross_entropy(theirs[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        assert torch.allclose(out.token_loss[:, :-1], hf_loss, atol=1e-5)
        # Packed rows: the first document of row 1 equals that document alone.
        packed = model.logits(ids, position_ids=pos)
        alone = hf(ids[1:, :9]).logits
        assert torch.allclose(packed[1, :9], alone[0], atol=1e-5)


def test_transformers_checkpoint_loads_natively(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    hf.save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert model.config.attention_bias and model.config.family == "qwen2"
    ids = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        assert torch.allclose(model.logits(ids), hf(ids).logits, atol=1e-5)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    model = build_model(get_preset("tiny"), seed=0)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_presets_have_published_sizes():
    # Parameter counts of the published checkpoints, to 1%.
    expected = {"tinyllama-1.1b": 1.100e9, "llama3.2-1b": 1.236e9, "llama3.1-8b": 8.030e9,
                "qwen2.5-1.5b": 1.544e9, "mistral-7b": 7.248e9, "qwen3-0.6b": 0.596e9}
    for name, n in expected.items():
        assert abs(get_preset(name).num_parameters() / n - 1) < 0.01, name
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("gpt-5")


@pytest.mark.parametrize("own_tokenizer", [False, True])
def test_training_checkpoint_is_self_contained(tmp_path, own_tokenizer):
    """AutoTokenizer + AutoModelForCausalLM load a training checkpoint as it is,
    and greedy ``generate`` writes what the native model decodes greedily."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from centrifuge.data import corpus, load_tokenizer
    from centrifuge.training import TrainConfig, train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.documents("train", 0, 60)))
    tok_arg = None
    if own_tokenizer:  # a word-level tokenizer whose only special token is its eos
        vocab = sorted({w for t in corpus.documents("train", 0, 60) for w in t.split()})[:500]
        words = {w: i for i, w in enumerate(vocab)}
        words |= {"<unk>": len(words), "</s>": len(words) + 1}
        tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok_arg = str(tmp_path / "tok.json")
        tk.save(tok_arg)
    # transformers replaces any tokenizer of a qwen2 model by its Qwen2Tokenizer: byte one only
    model_name = "tiny-qwen2" if not own_tokenizer else "tiny"
    s = train(TrainConfig(model=model_name, data=[str(data)], tokenizer=tok_arg, select="loss",
                          seq_len=32, batch_size=2, steps=3, lr=1e-2, eval_interval=0,
                          eval_rows=2, out_dir=str(tmp_path / "run"), device="cpu",
                          cache_dir=str(tmp_path / "cache")), progress=False)  # fmt: skip
    ckpt = s["checkpoint"]
    ours_tok = load_tokenizer(tok_arg)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert hf_tok.eos_token_id == ours_tok.eos_id == hf.config.eos_token_id
    model = LlamaForCausalLM.from_pretrained(ckpt)
    prompt = "Tom has 3 apples and buys 4 more. How many?" if own_tokenizer else "Tom hés 3 "
    ids = ours_tok.encode(prompt)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    n_new = 12
    greedy = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            greedy.append(int(model.logits(torch.tensor([greedy]))[0, -1].argmax()))
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                          eos_token_id=None)  # fmt: skip
    assert out[0].tolist() == greedy
    assert hf_tok.decode(out[0][len(ids):]) == ours_tok.decode(greedy[len(ids):])
    # the checkpoint's byte tokenizer reads back as the built-in one (same token cache)
    assert type(load_tokenizer(ckpt)) is type(ours_tok)
