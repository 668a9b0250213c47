import json

import pytest

from centrifuge.bench import BenchConfig, run_bench
from centrifuge.bench.report import to_markdown
from centrifuge.cli import main
from centrifuge.models import get_preset


def test_bench_runs_every_variant_on_cpu():
    cfg = BenchConfig(preset="tiny", seq_len=32, batch=2, ratios=[0.5, 1.0], dtype="fp32",
                      device="cpu", warmup=1, repeats=2)  # fmt: skip
    result = run_bench(cfg)
    names = {(r["variant"], r["ratio"]) for r in result["rows"]}
    assert names == {("dense", None), ("masked", 0.5), ("centrifuge", 0.5), ("hf-masked", 0.5),
                     ("masked", 1.0), ("centrifuge", 1.0), ("hf-masked", 1.0),
                     ("hf-patched", 0.5), ("hf-patched", 1.0),
                     ("hf-patched-labels", 0.5), ("hf-patched-labels", 1.0)}  # fmt: skip
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["forward_ms"] > 0 and r["backward_ms"] > 0
    by = {(r["variant"], r["ratio"]): r for r in result["rows"]}
    s = result["ratios"][0]
    assert s["ratio"] == 0.5
    assert s["c/a"]["step"] == pytest.approx(
        by[("centrifuge", 0.5)]["step_ms"] / by[("dense", None)]["step_ms"]
    )
    assert s["hfp/c"]["step"] == pytest.approx(
        by[("hf-patched-labels", 0.5)]["step_ms"] / by[("centrifuge", 0.5)]["step_ms"]
    )
    assert "| Centrifuge | 0.50 |" in to_markdown(result)


def test_bench_cli_writes_outputs(tmp_path):
    rc = main(["bench", "--preset", "tiny", "--seq-len", "16", "--batch", "1", "--ratios", "0.5",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "fp32", "--no-hf",
               "--knob", "extra=0.3", "--knob", "exact_layers=1", "--knob", "exact_top=1,kv_projections=1",
               "--knob", "backward_ratio=0.7", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "tiny-s16-b1-fp32.json").read_text())
    knobs = {"centrifuge+extra0.3", "centrifuge+exact1", "centrifuge+exacttop1+kvproj",
             "centrifuge+backward0.7"}
    assert {r["variant"] for r in data["rows"]} == {"dense", "masked", "centrifuge"} | knobs
    assert set(data["ratios"][0]["knobs"]) == knobs
    assert "| centrifuge+exact1 | 0.50 |" in (tmp_path / "tiny-s16-b1-fp32.md").read_text()
    assert (tmp_path / "tiny-s16-b1-fp32.png").stat().st_size > 0


def test_bench_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        BenchConfig(ratios=[0.0])
    with pytest.raises(ValueError, match="bad backward option"):
        BenchConfig(knobs=["extra:0.3"])
    with pytest.raises(ValueError, match="every ratio must be at most 0.6 .* 0.7, 1 exceed"):
        BenchConfig(ratios=[0.5, 0.7, 1.0], knobs=["backward_ratio=0.6"])


def test_bench_activation_checkpointing_variants(tmp_path):
    rc = main(["bench", "--preset", "tiny", "--seq-len", "16", "--batch", "1", "--ratios", "0.5",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "fp32", "--no-hf",
               "--activation-checkpointing", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "tiny-s16-b1-fp32-ckpt.json").read_text())
    names = {r["variant"] for r in data["rows"]}
    assert names == {"dense", "masked", "centrifuge", "dense-ckpt", "masked-ckpt", "centrifuge-ckpt"}
    by = {(r["variant"], r["ratio"]): r for r in data["rows"]}
    s = data["ratios"][0]
    assert s["cc/ac"]["step"] == pytest.approx(
        by[("centrifuge-ckpt", 0.5)]["step_ms"] / by[("dense-ckpt", None)]["step_ms"]
    )
    assert "step cc/ac" in (tmp_path / "tiny-s16-b1-fp32-ckpt.md").read_text()


def test_bench_lora(tmp_path):
    pytest.importorskip("peft")
    cfg = BenchConfig(preset="tiny", seq_len=16, batch=1, ratios=[0.5], dtype="fp32", device="cpu",
                      warmup=0, repeats=1, lora=2, hf=False)  # fmt: skip
    result = run_bench(cfg)
    assert {r["variant"] for r in result["rows"]} == {"dense", "masked", "centrifuge"}
    assert "LoRA rank 2" in to_markdown(result)
    c = get_preset("tiny")  # adapters on 7 projections per layer: r * (in + out) each
    per_layer = 2 * (4 * (c.hidden_size + c.hidden_size) + 3 * (c.hidden_size + c.intermediate_size))
    assert result["model"]["trainable"] == c.num_layers * per_layer
    with pytest.raises(ValueError, match="lora rank"):
        BenchConfig(lora=0)


def test_bench_checkpointing_and_lora_refuse_parallel(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--parallel", "ddp",
                 "--activation-checkpointing"]) == 2  # fmt: skip
    assert "do not combine with --parallel" in capsys.readouterr().err


def test_device_busy_time_counts_overlapping_kernels_once():
    from centrifuge.bench.runner import union_length

    assert union_length([]) == 0.0
    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4.0  # [0, 3] and [5, 6]
    assert union_length([(0, 10), (2, 3), (4, 12)]) == 12.0


def test_sft_labels_and_variants_time_supervised_fine_tuning():
    """--prompt-share: completion-only labels whose host counts match what the
    model finds, every native variant gives the same loss value at one ratio, and
    both context semantics are timed."""
    import torch

    from centrifuge.bench.variants import SFTLabels, native_variants
    from centrifuge.models import build_model
    from centrifuge.plan import Layout, context_rows

    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    labels, n_valid, context, n_context = SFTLabels(0.3)(ids)
    assert (labels[:, :6] == -100).all() and torch.equal(labels[:, 6:], ids[:, 6:])
    valid = torch.zeros(3, 20, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    assert n_valid == int(valid.sum())
    assert torch.equal(context, context_rows(valid, Layout.build(3, 20)))
    assert n_context == int(context.sum())
    with pytest.raises(ValueError, match="prompt share"):
        SFTLabels(1.0)

    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=0)
    variants = {v.name: v for v in native_variants(model, prompt_share=0.3)}
    assert set(variants) == {"dense", "masked", "centrifuge", "centrifuge+context-constant"}
    losses = {name: v.loss(ids, 0.5).item() for name, v in variants.items() if v.filtered}
    assert len({round(x, 12) for x in losses.values()}) == 1, losses
    dense = variants["dense"].loss(ids, 1.0).item()
    plain = model(ids, labels=labels)
    assert dense == pytest.approx((plain.token_loss.sum() / plain.valid.sum()).item(), rel=1e-12)


def test_knob_variants_with_a_host_sync_are_not_captured():
    """A knob variant is captured as CUDA graphs only when its step never waits
    for the host: sampled rows (a CPU draw) are not; kv_projections is, on
    either path (its key rows are counted on the host)."""
    import torch

    from centrifuge.bench.variants import native_variants
    from centrifuge.models import build_model

    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=0)
    specs = {"exact_top=1": True, "backward_ratio=0.7": True, "kv_projections=1,path=dense": True,
             "extra=0.3": False, "kv_projections=1": True, "kv_projections=1,path=compact": True}
    variants = native_variants(model, knobs=tuple(specs))[3:]
    assert [v.capturable for v in variants] == list(specs.values())


def test_captured_variants_take_the_compact_path(monkeypatch):
    """The steps the bench captures run what centrifuge train --cuda-graphs runs:
    Centrifuge's auto path becomes compact (small models' eager steps take the
    dense one); a path given explicitly and the masked loss stay as they are."""
    import torch

    from centrifuge.bench.variants import native_variants
    from centrifuge.models import build_model

    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=0)
    seen = []
    forward = model.forward

    def spy(*args, backward="amplified", **kw):
        from centrifuge.plan import BackwardOptions

        opts = BackwardOptions.of(backward)
        seen.append((opts.mode, opts.path))
        return forward(*args, backward=backward, **kw)

    monkeypatch.setattr(model, "forward", spy)
    ids = torch.randint(0, get_preset("tiny").vocab_size, (2, 16))
    for captured, want in ((False, "auto"), (True, "compact")):
        variants = {v.name: v for v in native_variants(model, knobs=("path=dense",), captured=captured)}
        seen.clear()
        for name in ("masked", "centrifuge", "centrifuge+dense"):
            variants[name].loss(ids, 0.5)
        assert seen == [("exact", "auto"), ("amplified", want), ("amplified", "dense")], captured


def test_cuda_graphs_need_a_gpu_and_a_warmup_round():
    import torch

    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        BenchConfig(preset="tiny", device="cpu", cuda_graphs=True)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--warmup 1 or more"):
            BenchConfig(preset="tiny", device="cuda", cuda_graphs=True, warmup=0)
