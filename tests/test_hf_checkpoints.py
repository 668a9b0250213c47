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
