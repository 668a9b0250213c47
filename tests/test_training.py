"""Training: the CLI end to end, exact resume, options, and every error path
(each raised before any training starts)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from centrifuge.cli import main
from centrifuge.data import corpus
from centrifuge.models import LlamaForCausalLM
from centrifuge.training import CheckpointError, TrainConfig, train
from centrifuge.training.loop import DataOrder
from centrifuge.training.metrics import read_metrics


def tiny(tmp_path, data_file, cache, **kw):
    base = dict(model="tiny", data=[str(data_file)], select="loss", ratio=0.5, seq_len=32,
                batch_size=2, steps=5, warmup_steps=2, lr=1e-2, eval_interval=0, eval_rows=4,
                save_interval=0, out_dir=str(tmp_path / "run"), cache_dir=cache, device="cpu")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_cli_default_corpus_end_to_end(tmp_path, cache, capsys):
    """The built-in path: reference trained on the clean split, rho1, eval with accuracy."""
    out = tmp_path / "out"
    rc = main(["train", "--model", "tiny", "--steps", "3", "--seq-len", "64", "--batch-size", "2",
               "--reference-steps", "2", "--eval-rows", "4", "--eval-problems", "6",
               "--eval-interval", "2", "--out-dir", str(out), "--cache-dir", cache, "--quiet"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    for field in ("done: 3 steps", "tokens seen", "kept", "tokens/s", "train loss", "eval loss",
                  "eval accuracy", "checkpoint", "metrics"):  # fmt: skip
        assert field in text
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "reference" / "checkpoint-2" / "model.safetensors").is_file()
    records = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert all(0.55 < r["kept_fraction"] < 0.65 for r in train_recs)  # default ρ = 0.6
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 3]
    assert all(r["accuracy"] is not None for r in records if r["kind"] == "eval")
    # the checkpoint is a Hugging Face model directory: both loaders agree
    ours = LlamaForCausalLM.from_pretrained(out / "checkpoint-3")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3", dtype=torch.float32)
    ids = torch.randint(0, 258, (1, 20))
    torch.testing.assert_close(hf(ids).logits.float(), ours.logits(ids), atol=1e-4, rtol=1e-4)
    # resuming with a larger budget continues the run and reuses the finished reference
    ref_file = out / "reference" / "checkpoint-2" / "model.safetensors"
    stamp = ref_file.stat().st_mtime_ns
    rc = main(["train", "--model", "tiny", "--steps", "4", "--seq-len", "64", "--batch-size", "2",
               "--reference-steps", "2", "--eval-rows", "4", "--eval-problems", "6",
               "--eval-interval", "2", "--out-dir", str(out), "--cache-dir", cache, "--quiet",
               "--resume"])  # fmt: skip
    assert rc == 0 and "done: 4 steps" in capsys.readouterr().out
    assert ref_file.stat().st_mtime_ns == stamp
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def _weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


class Crash(RuntimeError):
    pass


def test_resume_with_a_larger_budget_follows_the_new_schedule(tmp_path, data_file, cache):
    """A 3-step run resumed with --steps 6 trains what a 6-step run trains, in
    every parameter group: with 2 warm-up steps the two schedules agree on the
    first 3 steps, and the resumed steps must follow the 6-step one (the saved
    optimizer state holds the 3-step run's last lr)."""
    kw = dict(steps=6, save_interval=3, warmup_steps=2, lr=1e-2)
    train(tiny(tmp_path / "a", data_file, cache, **kw), progress=False)
    train(tiny(tmp_path / "b", data_file, cache, **dict(kw, steps=3)), progress=False)
    train(tiny(tmp_path / "b", data_file, cache, resume=True, **kw), progress=False)
    wa = _weights(tmp_path / "a" / "run" / "checkpoint-6")
    wb = _weights(tmp_path / "b" / "run" / "checkpoint-6")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = ([r["lr"] for r in read_metrics(tmp_path / d / "run" / "metrics.jsonl") if r["kind"] == "train"]
              for d in "ab")  # fmt: skip
    assert la == lb


@pytest.mark.parametrize("variant", [
    dict(select="random", backward="amplified", grad_accum=2, granularity="sequence"),
    dict(select="loss", backward="exact", grad_clip=0.0),
    dict(select="loss", backward_extra=0.5, exact_layers=1),  # the sampling generator resumes too
    dict(select="loss", exact_top=1, kv_projections=True),
])  # fmt: skip
def test_resume_is_exact(tmp_path, data_file, cache, variant):
    straight = train(tiny(tmp_path / "a", data_file, cache, steps=6, **variant), progress=False)

    def crash_at_4(step, record):
        if step == 4:
            raise Crash()

    cfg = tiny(tmp_path / "b", data_file, cache, steps=6, save_interval=3, **variant)
    with pytest.raises(Crash):
        train(cfg, progress=False, callback=crash_at_4)
    run_b = tmp_path / "b" / "run"
    assert (run_b / "latest").read_text().strip() == "checkpoint-3"
    resumed = train(tiny(tmp_path / "b", data_file, cache, steps=6, save_interval=3, resume=True,
                         **variant), progress=False)  # fmt: skip
    assert resumed["steps"] == straight["steps"] == 6
    wa, wb = _weights(tmp_path / "a" / "run" / "checkpoint-6"), _weights(run_b / "checkpoint-6")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(tmp_path / "a" / "run" / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    sb = torch.load(run_b / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    for i, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"])
    assert sa["tokens_kept"] == sb["tokens_kept"] and sa["data"] == sb["data"]
    # the metrics file tells one history: the interrupted step 4 is not duplicated
    la = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_metrics(run_b / "metrics.jsonl") if r["kind"] == "train"]
    assert la == lb
    assert straight["tokens_kept"] == resumed["tokens_kept"]


def test_resume_with_a_reference_model_and_given_checkpoint(tmp_path, data_file, cache):
    """rho1 against a reference model directory; --resume CHECKPOINT picks a given one."""
    ref = train(tiny(tmp_path / "ref", data_file, cache, select="none", steps=2), progress=False)
    common = dict(select="rho1", reference=ref["checkpoint"], steps=4)
    train(tiny(tmp_path / "a", data_file, cache, **common), progress=False)
    part = tiny(tmp_path / "b", data_file, cache, save_interval=1, **common)
    with pytest.raises(Crash):
        train(part, progress=False, callback=lambda s, r: (_ for _ in ()).throw(Crash()) if s == 3 else None)
    ckpt2 = tmp_path / "b" / "run" / "checkpoint-2"
    resumed = train(tiny(tmp_path / "b", data_file, cache, save_interval=1, resume=str(ckpt2),
                         **common), progress=False)  # fmt: skip
    wa, wb = _weights(tmp_path / "a" / "run" / "checkpoint-4"), _weights(tmp_path / "b" / "run" / "checkpoint-4")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["reference"].startswith("model ")


def test_token_budget_bf16_and_selection_counts(tmp_path, data_file, cache):
    cfg = tiny(tmp_path, data_file, cache, steps=100, max_tokens=3 * 2 * 32, dtype="bf16",
               select="random", ratio=0.3)  # fmt: skip
    s = train(cfg, progress=False)
    assert s["steps"] == 3
    recs = [r for r in read_metrics(s["metrics"]) if r["kind"] == "train"]
    assert all(abs(r["kept_fraction"] - 0.3) < 0.05 for r in recs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert s["eval_loss"] is not None and s["eval_accuracy"] is None  # user data: no problems


def test_training_learns(tmp_path, data_file, cache):
    s = train(tiny(tmp_path, data_file, cache, steps=25, select="none", lr=1e-2, seq_len=32,
                   batch_size=4, eval_rows=8), progress=False)  # fmt: skip
    evals = [r["loss"] for r in read_metrics(s["metrics"]) if r["kind"] == "eval"]
    assert evals[-1] < evals[0] - 1.5  # from ~ln(512) = 6.2 to well below


def test_config_file_and_overrides(tmp_path, data_file, cache):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: tiny\nseq-len: 16\nratio: 0.25\ndata: [{data_file}]\n")
    cfg = TrainConfig.from_file(y, ratio=0.5)
    assert (cfg.model, cfg.seq_len, cfg.ratio, cfg.data) == ("tiny", 16, 0.5, [str(data_file)])
    t = tmp_path / "c.toml"
    t.write_text('select = "random"\nsteps = 7\n')
    assert TrainConfig.from_file(t).steps == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 7\n")
    with pytest.raises(ValueError, match=f"config file {bad}: unknown training option.*'stepz' "
                                         r"\(did you mean 'steps'\?\)"):  # fmt: skip
        TrainConfig.from_file(bad)
    # YAML 1.1 reads 1e-3 as text: numbers written so are numbers, and other text is refused
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("lr: 1e-3\nmax_tokens: 2e4\nwarmup_steps: 5.0\n")
    cfg = TrainConfig.from_file(numbers)
    assert (cfg.lr, cfg.max_tokens, cfg.warmup_steps) == (1e-3, 20000, 5)
    assert type(cfg.max_tokens) is int and type(cfg.warmup_steps) is int
    for text, match in (("lr: fast\n", "lr must be a number, got 'fast'"),
                        ("steps: 2.5\n", "steps must be an integer, got 2.5")):  # fmt: skip
        numbers.write_text(text)
        with pytest.raises(ValueError, match=f"config file {numbers}: {match}"):
            TrainConfig.from_file(numbers)
    with pytest.raises(ValueError, match="lr must be a number, got '1e-3'"):
        TrainConfig(lr="1e-3")  # in Python, a number is a number
    out = tmp_path / "cli"
    rc = main(["train", "--config", str(y), "--steps", "2", "--select", "none", "--batch-size", "1",
               "--cache-dir", cache, "--out-dir", str(out), "--quiet", "--eval-rows", "2"])  # fmt: skip
    assert rc == 0
    ck = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert ck["hidden_size"] == 64
    assert torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=True)["config"]["seq_len"] == 16


@pytest.mark.parametrize("kw, exc, match", [
    (dict(data=["/nonexistent/data.jsonl"]), FileNotFoundError, "does not exist"),
    (dict(model="no-such-preset"), ValueError, "neither a preset"),
    (dict(seq_len=4096), ValueError, "larger than the model supports"),
    (dict(select="rho1"), ValueError, "needs a reference"),
    (dict(select="rho1", reference_scores="/nonexistent/scores"), ValueError, "no reference-score store"),
    (dict(resume=True), CheckpointError, "nothing to resume"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "nodev"), ValueError, "device"),
])  # fmt: skip
def test_errors_before_training(tmp_path, data_file, cache, kw, exc, match):
    with pytest.raises(exc, match=match):
        train(tiny(tmp_path, data_file, cache, **kw), progress=False)
    assert not (tmp_path / "run").exists()


def test_empty_data_and_bad_options(tmp_path, cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="empty after tokenization"):
        train(TrainConfig(model="tiny", data=[str(empty)], select="none", cache_dir=cache,
                          out_dir=str(tmp_path / "o")), progress=False)  # fmt: skip
    for kw, match in [(dict(ratio=1.5), "ratio"), (dict(ratio=0.0), "ratio"),
                      (dict(select="best"), "select"), (dict(backward="fast"), "backward"),
                      (dict(steps=0), "steps"), (dict(dtype="fp16"), "dtype"),
                      (dict(granularity="doc"), "granularity"), (dict(lr=-1.0), "lr"),
                      (dict(reference="a", reference_scores="b"), "either"),
                      (dict(backward_extra=1.5), "extra"), (dict(exact_layers=-1), "exact_layers"),
                      (dict(backward="exact", exact_layers=1), "mode 'exact'"),
                      (dict(backward="exact", kv_projections=True), "mode 'exact'"),
                      (dict(exact_top=-1), "exact_top"), (dict(kv_projections=1), "kv_projections"),
                      (dict(select="none", exact_top=1, kv_projections=True),
                       "exact_top and kv_projections act on filtered tokens"),
                      (dict(select="none", exact_layers=1), "exact_layers acts on filtered tokens"),
                      (dict(select="none", backward_extra=0.3, backward_extra_weight=2.0),
                       "backward_extra and backward_extra_weight act on filtered tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)


def test_cli_reports_errors(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["train", "--ratio", "0", "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and "ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--select", "best"])


def test_scores_not_matching_the_data(tmp_path, data_file, cache):
    from centrifuge.data import load_dataset
    from centrifuge.models import build_model, get_preset
    from centrifuge.scoring import score_dataset

    data_file = tmp_path / "small.jsonl"  # few rows: scoring stays cheap
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.documents("train", 1, 8)))
    ds16 = load_dataset([str(data_file)], None, 16, cache_dir=cache)
    store = tmp_path / "scores"
    score_dataset(build_model(get_preset("tiny"), seed=0), ds16, store, batch_size=64)
    ok = train(tiny(tmp_path / "ok", data_file, cache, select="rho1", seq_len=16, steps=1,
                    reference_scores=str(store)), progress=False)  # fmt: skip
    assert ok["steps"] == 1 and ok["reference"].startswith("precomputed")
    with pytest.raises(ValueError, match="computed for dataset|shape"):
        train(tiny(tmp_path, data_file, cache, select="rho1", seq_len=32,
                   reference_scores=str(store)), progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()  # checked before the first write


def test_resume_mismatch_and_corrupt_checkpoint(tmp_path, data_file, cache):
    train(tiny(tmp_path, data_file, cache, steps=2), progress=False)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(tiny(tmp_path, data_file, cache, steps=4, batch_size=3, resume=True), progress=False)
    with pytest.raises(CheckpointError, match="different model"):
        train(tiny(tmp_path, data_file, cache, steps=4, model="tiny-gqa", resume=True), progress=False)
    w = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny(tmp_path, data_file, cache, steps=4, resume=True), progress=False)


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from centrifuge.training.metrics import MetricsLog

    scalars = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(tmp_path)
    assert log.tensorboard
    log.log(dict(kind="train", step=3, loss=1.5, kept_fraction=0.5, note="x"))
    log.log(dict(kind="eval", step=3, loss=1.25, accuracy=None))
    log.close()
    assert scalars == [("train/loss", 1.5, 3), ("train/kept_fraction", 0.5, 3), ("eval/loss", 1.25, 3), "closed"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3, 3]
    MetricsLog(tmp_path, resume_step=2).close()  # resuming from step 2 drops later records
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_start_from_a_checkpoint_directory_and_tokenizer_checks(tmp_path, data_file, cache):
    """--model DIR fine-tunes a saved model, given as a checkpoint or as the run
    directory (its latest checkpoint, as eval and score take it); a tokenizer
    larger than its vocabulary is refused."""
    first = train(tiny(tmp_path / "a", data_file, cache, steps=2), progress=False)
    again = train(tiny(tmp_path / "b", data_file, cache, steps=1, model=first["checkpoint"],
                       eval_rows=2), progress=False)  # fmt: skip
    assert again["steps"] == 1
    from_run = train(tiny(tmp_path / "d", data_file, cache, steps=1, model=str(tmp_path / "a" / "run"),
                          eval_rows=2), progress=False)  # fmt: skip
    a, b = (load_file(f"{s['checkpoint']}/model.safetensors") for s in (again, from_run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(600)} | {"</s>": 600, "<unk>": 601}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tk.save(str(tok_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer has 602 tokens.*only 512"):
        train(tiny(tmp_path / "c", data_file, cache, model=first["checkpoint"], tokenizer=str(tok_dir)),
              progress=False)  # fmt: skip


def test_stop_training_saves_and_resume_continues(tmp_path, data_file, cache):
    from centrifuge.training import StopTraining

    def stop_at_2(step, record):
        if step == 2:
            raise StopTraining

    s = train(tiny(tmp_path, data_file, cache, steps=4), progress=False, callback=stop_at_2)
    assert s["steps"] == 2 and s["checkpoint"].endswith("checkpoint-2")
    s = train(tiny(tmp_path, data_file, cache, steps=4, resume=True), progress=False)
    assert s["steps"] == 4 and s["checkpoint"].endswith("checkpoint-4")


def _completion_targets(batch) -> torch.Tensor:
    """[n, L] bool: the rows that predict a labelled token of their own document
    (the next position continues the document: no restart at 0)."""
    lab, pos = batch["labels"], batch["position_ids"]
    out = torch.zeros_like(lab, dtype=torch.bool)
    out[:, :-1] = (lab[:, 1:] != -100) & (pos[:, 1:] != 0)
    return out


def test_prompt_completion_training(tmp_path, sft_file, cache):
    """The loss is on the completions only, in training (every kept row predicts a
    completion token) and in the held-out loss; tokens seen count the prompts too."""
    import math

    import torch.nn.functional as F

    from centrifuge.data import load_dataset

    cfg = tiny(tmp_path, sft_file, cache, select="none", steps=4, seq_len=64, batch_size=4, eval_rows=8)
    s = train(cfg, progress=False)
    ds = load_dataset([str(sft_file)], None, 64, cache_dir=cache)
    prompts = [json.loads(line)["prompt"] for line in sft_file.read_text().splitlines()]
    assert ds.data_format == "prompt-completion"
    assert ds.context_tokens == sum(len(p) for i, p in enumerate(prompts) if i % 50 != 49)  # bytes
    steps = [ds.batch(DataOrder(len(ds), 4, 1, cfg.seed).rows(step, 0)) for step in range(4)]
    assert s["tokens_kept"] == sum(int(_completion_targets(b).sum()) for b in steps)  # ρ = 1
    assert s["tokens_seen"] == sum(int((b["input_ids"] != ds.pad_id).sum()) for b in steps)
    assert s["tokens_kept"] < 0.8 * s["tokens_seen"]
    ev = load_dataset([str(sft_file)], None, 64, split="eval", cache_dir=cache)
    b = ev.batch(range(min(len(ev), 8)))
    model = LlamaForCausalLM.from_pretrained(s["checkpoint"])
    with torch.no_grad():
        ce = F.cross_entropy(model.logits(b["input_ids"], position_ids=b["position_ids"])[:, :-1].transpose(1, 2),
                             b["input_ids"][:, 1:], reduction="none")  # fmt: skip
    t = _completion_targets(b)[:, :-1]
    assert s["eval_loss"] == pytest.approx(float(ce[t].double().mean()), rel=1e-5)
    assert not math.isclose(s["eval_loss"], float(ce.double().mean()), rel_tol=1e-2)  # prompts would count

    # rho1 with precomputed reference scores: prompt rows score 0 and are never kept
    from centrifuge.models import build_model, get_preset
    from centrifuge.scoring import load_reference_scores, score_dataset
    from centrifuge.selection import Selector

    store = tmp_path / "scores"
    score_dataset(build_model(get_preset("tiny"), seed=1), ds, store, batch_size=64)
    scores = torch.from_numpy(np.array(load_reference_scores(store, ds)))
    targets = _completion_targets(ds.batch(range(len(ds))))
    assert (scores[~targets] == 0).all() and (scores[targets] > 0).all()
    r = train(tiny(tmp_path / "rho1", sft_file, cache, select="rho1", ratio=0.5, steps=2, seq_len=64,
                   batch_size=4, reference_scores=str(store)), progress=False)  # fmt: skip
    counts = Selector("rho1", 0.5).count
    assert r["tokens_kept"] == sum(counts(_completion_targets(b)) for b in steps[:2])


def test_prompt_completion_fields_from_the_cli(tmp_path, cache, capsys):
    recs = [{"question": f"What is {i} + 1? ", "answer": f"{i + 1}."} for i in range(60)]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["train", "--model", "tiny", "--data", str(f), "--select", "loss", "--steps", "1",
            "--seq-len", "32", "--batch-size", "2", "--eval-rows", "2", "--cache-dir", cache,
            "--out-dir", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "qa.jsonl:1: no 'text' field (found ['question', 'answer'])" in capsys.readouterr().err
    assert main(args + ["--prompt-field", "question", "--completion-field", "answer"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out
    options = json.loads((tmp_path / "o" / "options.json").read_text())
    assert (options["prompt_field"], options["completion_field"]) == ("question", "answer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f.read_text() + json.dumps({"question": "no answer"}) + "\n")
    assert main(args + ["--data", str(bad), "--prompt-field", "question", "--completion-field",
                        "answer", "--out-dir", str(tmp_path / "o2")]) == 2  # fmt: skip
    assert "bad.jsonl:61: no 'answer' field (found ['question'])" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "metrics.jsonl").exists()


def test_chat_records_with_a_templated_tokenizer(tmp_path, cache, chat_tokenizer):
    """messages records train through the tokenizer's chat template, on the assistant
    turns only; the checkpoint carries the template."""
    from centrifuge.data import load_dataset, load_tokenizer

    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    recs = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(60)]  # fmt: skip
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = str(chat_tokenizer(template))
    s = train(tiny(tmp_path, f, cache, tokenizer=tok, select="none", steps=2, seq_len=32, eval_rows=2),
              progress=False)  # fmt: skip
    ds = load_dataset([str(f)], load_tokenizer(tok), 32, cache_dir=cache)
    assert ds.context_tokens == sum(len(f"user: What is {i} + 1?\nassistant: ") for i in range(60) if i != 49)
    steps = [ds.batch(DataOrder(len(ds), 2, 1, 0).rows(step, 0)) for step in range(2)]
    assert s["tokens_kept"] == sum(int(_completion_targets(b).sum()) for b in steps)
    assert load_tokenizer(s["checkpoint"]).chat_template == template


def test_train_step_times_script_reports_the_loop_ratios(tmp_path, data_file, cache, load_script, capsys):
    """scripts/train_step_times.py runs centrifuge train's dense, masked and
    Centrifuge steps and reports their ratios (eager here: the CPU has no graphs)."""
    script = load_script("train_step_times")
    assert script.main([str(tmp_path), "--model", "tiny", "--seq-len", "32", "--batch-size", "2",
                        "--steps", "3", "--skip", "1", "--dtype", "fp32", "--modes", "eager",
                        "--data", str(data_file), "--cache-dir", cache]) == 0
    rows = json.loads((tmp_path / "train-step-times.json").read_text())["rows"]
    assert [(r["variant"], r["graphs"]) for r in rows] == [("dense", False), ("masked", False), ("centrifuge", False)]
    assert all(r["step_ms"] > 0 for r in rows)
    table = capsys.readouterr().out
    c_over_a = rows[2]["step_ms"] / rows[0]["step_ms"]
    assert f"| eager | {rows[0]['step_ms']:.1f} |" in table and f"{c_over_a:.3f}" in table


def test_train_step_times_profile_needs_room_and_cuda(tmp_path, load_script, capsys):
    """--profile's steps must fit after --skip, and it measures the device."""
    script = load_script("train_step_times")
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--steps", "10", "--skip", "8", "--profile", "2"])
    assert "must be below --steps 10" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            script.main([str(tmp_path), "--profile", "3"])
        assert "--profile needs CUDA" in capsys.readouterr().err
