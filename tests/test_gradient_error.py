"""The gradient diagnosis: a backward setting's gradient against the exact
masked-loss gradient, by parameter group (float64, CPU)."""

import json

import pytest
import torch

from centrifuge.evaluation.gradient_error import agreement, diagnose, model_gradients, parameter_group
from centrifuge.models import build_model, get_preset
from centrifuge.models.reference import reference_filtered_loss
from centrifuge.plan import BackwardOptions
from centrifuge.selection import Selector


def test_parameter_groups():
    assert parameter_group("model.embed_tokens.weight") == ("embedding", None)
    assert parameter_group("model.layers.3.self_attn.k_proj.weight") == ("k", 3)
    assert parameter_group("model.layers.0.self_attn.q_norm.weight") == ("q", 0)
    assert parameter_group("model.layers.1.mlp.down_proj.weight") == ("mlp", 1)
    assert parameter_group("model.layers.1.post_attention_layernorm.weight") == ("norms", 1)
    assert parameter_group("model.norm.weight") == ("final_norm", None)
    assert parameter_group("lm_head.weight") == ("lm_head", None)


def test_agreement_against_the_reference_and_the_exact_gradient():
    model = build_model(get_preset("tiny-gqa"), dtype=torch.float64, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    batch = dict(input_ids=ids, labels=ids)
    out = model(ids, labels=ids)
    keep = Selector("loss", 0.4)(out.token_loss, out.valid)
    exact = model_gradients(model, batch, keep, "exact")
    same = agreement(exact, exact)
    assert same["all"]["rel_error"] == 0 and same["all"]["cosine"] == pytest.approx(1)

    result = diagnose(model, batch, keep, {"amplified": BackwardOptions(),
                                           "all exact layers": BackwardOptions(exact_layers=2)})
    assert result["all exact layers"]["all"]["rel_error"] < 1e-12
    amplified = result["amplified"]
    # The amplified gradient is the reference semantics' one: agreement computed
    # by hand from the reference model gives the same numbers.
    reference_filtered_loss(model, ids, ids, keep).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    by_hand = agreement(ref, exact)
    for key in ("all", "embedding", "k", "v", "mlp", "layer/0", "k/1"):
        assert amplified[key]["rel_error"] == pytest.approx(by_hand[key]["rel_error"], rel=1e-9)
        assert amplified[key]["cosine"] == pytest.approx(by_hand[key]["cosine"], rel=1e-9)
    assert 0 < amplified["all"]["rel_error"] and amplified["all"]["cosine"] < 1
    # The LM head and final norm see only the kept rows' loss, exactly as exact does.
    assert amplified["lm_head"]["rel_error"] < 1e-12
    # Rows ranked next join the backward: every valid row (ratio 1) is the exact gradient.
    select = Selector("loss", 0.4)
    result = diagnose(model, batch, keep, {r: BackwardOptions(backward_ratio=r) for r in (0.7, 1.0)},
                      ranked=lambda r: select.select(out.token_loss, out.valid, backward_ratio=r)[1])  # fmt: skip
    assert result[1.0]["all"]["rel_error"] < 1e-12
    assert 0 < result[0.7]["all"]["rel_error"] < amplified["all"]["rel_error"]


def test_diagnosis_script_writes_every_setting(tmp_path, capsys, load_script):
    script = load_script("gradient_diagnosis")
    out = tmp_path / "diag.json"
    assert script.main(["--model", "tiny", "--batches", "1", "--batch-size", "2", "--seq-len", "48",
                        "--setting", "amplified=", "--setting", "all_exact=exact_layers=2",
                        "--setting", "all_exact_top=exact_top=2", "--setting", "top1=exact_top=1",
                        "--setting", "kvproj=kv_projections=1", "--setting", "all_rows=backward_ratio=1",
                        "--out", str(out)]) == 0  # fmt: skip
    mean = json.loads(out.read_text())["mean"]
    assert set(mean) == {"amplified", "all_exact", "all_exact_top", "top1", "kvproj", "all_rows"}
    for name in ("all_exact", "all_exact_top"):  # tiny has 2 layers: exact everywhere
        assert mean[name]["all"]["rel_error"] < 1e-5
    assert mean["all_rows"]["all"]["rel_error"] < 1e-5  # every labelled row in the backward
    assert mean["amplified"]["all"]["rel_error"] > 1e-3
    # Both move the K/V gradients toward the exact ones and leave the MLP's as
    # they are: no filtered row's gradient reaches an MLP under either.
    for name in ("top1", "kvproj"):
        assert mean[name]["k"]["rel_error"] < mean["amplified"]["k"]["rel_error"]
        assert mean[name]["mlp"]["rel_error"] == pytest.approx(mean["amplified"]["mlp"]["rel_error"])
    assert "| amplified |" in capsys.readouterr().out


def test_diagnosis_script_loads_a_run_directory_and_names_a_missing_one(tmp_path, load_script):
    script = load_script("gradient_diagnosis")
    model = build_model(get_preset("tiny"), seed=3)
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoint-5")
    (run / "latest").write_text("checkpoint-5")
    loaded = script.load_model(str(run), torch.float32, "cpu")  # a run directory: its latest
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="does not exist"):  # not "unknown model preset"
        script.load_model(str(run / "checkpoint-150"), torch.float32, "cpu")
