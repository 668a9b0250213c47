"""The Rho-1 pipeline end to end: `centrifuge score` (and its resume), selection
with stored scores equals selection with an online reference model, and the
eval metrics (`centrifuge eval`) on inputs whose answer is known."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from centrifuge import Selector, build_model, get_preset
from centrifuge.cli import main
from centrifuge.data import corpus, load_dataset, load_tokenizer
from centrifuge.evaluation import evaluate
from centrifuge.models import LlamaForCausalLM, ModelConfig
from centrifuge.scoring import load_reference_scores, read_header, score_dataset

SEQ = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A small JSONL file of built-in training documents (noise included) and its cache."""
    d = tmp_path_factory.mktemp("data")
    with open(d / "docs.jsonl", "w") as f:
        for text in corpus.documents("train", seed=7, n=40):
            f.write(json.dumps({"text": text}) + "\n")
    return d / "docs.jsonl", d / "cache"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "reference"
    build_model(get_preset("tiny"), seed=11).save_pretrained(d)
    return d


def _score_cli(reference_dir, data, cache, out, *extra):
    return main(["score", "--model", str(reference_dir), "--data", str(data), "--seq-len", str(SEQ),
                 "--cache-dir", str(cache), "--out", str(out), "--batch-size", "3",
                 "--device", "cpu", *extra])  # fmt: skip


def test_score_cli_resumes_an_interrupted_run(tmp_path, user_data, reference_dir, capsys):
    data, cache = user_data
    ds = load_dataset([str(data)], load_tokenizer(None), SEQ, cache_dir=cache)
    ref = LlamaForCausalLM.from_pretrained(reference_dir)
    # The first run dies after two chunks (as if killed), the CLI picks it up.
    part = score_dataset(ref, ds, tmp_path / "s", batch_size=3, chunk_rows=6, max_chunks=2,
                         model_source=str(reference_dir))  # fmt: skip
    assert part["rows_done"] == 12 < len(ds)
    assert _score_cli(reference_dir, data, cache, tmp_path / "s", "--chunk-rows", "6") == 0
    assert "resumed at row 12" in capsys.readouterr().out
    resumed = np.array(load_reference_scores(tmp_path / "s", ds))
    assert _score_cli(reference_dir, data, cache, tmp_path / "fresh", "--chunk-rows", "6") == 0
    assert np.array_equal(resumed, load_reference_scores(tmp_path / "fresh", ds))
    assert read_header(tmp_path / "s")["model"]["source"] == str(reference_dir)
    # A float16 store: half the bytes, the same values to fp16 precision.
    assert _score_cli(reference_dir, data, cache, tmp_path / "h", "--dtype", "float16") == 0
    half = load_reference_scores(tmp_path / "h", ds)
    # Without --out the store goes beside the dataset's token cache.
    argv = ["score", "--model", str(reference_dir), "--data", str(data), "--seq-len", str(SEQ),
            "--cache-dir", str(cache), "--batch-size", "8", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    beside = next((ds.cache_dir / "reference_scores").iterdir())
    assert np.array_equal(load_reference_scores(beside, ds), resumed)
    assert half.dtype == np.float16 and half.nbytes * 2 == resumed.nbytes
    np.testing.assert_allclose(half.astype(np.float32), resumed, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def stored_scores(tmp_path_factory, user_data, reference_dir):
    data, cache = user_data
    store = tmp_path_factory.mktemp("scores") / "s"
    assert _score_cli(reference_dir, data, cache, store) == 0
    return store


@pytest.mark.parametrize("granularity", ["batch", "sequence"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_stored_scores_select_like_an_online_reference(user_data, reference_dir, stored_scores,
                                                       granularity, ratio):  # fmt: skip
    data, cache = user_data
    ds = load_dataset([str(data)], load_tokenizer(None), SEQ, cache_dir=cache)
    scores = load_reference_scores(stored_scores, ds)
    ref = LlamaForCausalLM.from_pretrained(reference_dir).eval()
    model = build_model(get_preset("tiny"), seed=5)  # the model being trained
    select = Selector("rho1", ratio, granularity)
    rng = np.random.default_rng(int(ratio * 10))
    for _ in range(3):
        rows = rng.choice(len(ds), size=4, replace=False)  # shuffled rows, as training reads them
        b = ds.batch(rows)
        out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
        with torch.no_grad():
            online = ref(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
        stored = torch.from_numpy(scores[rows])
        torch.testing.assert_close(stored[online.valid], online.token_loss[online.valid],
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
        keep_online = select(out.token_loss, out.valid, online.token_loss)
        keep_stored = select(out.token_loss, out.valid, stored)
        assert torch.equal(keep_online, keep_stored)
        assert 0 < int(keep_stored.sum()) < int(out.valid.sum())


class _Oracle(LlamaForCausalLM):
    """Final hidden state = a scaled one-hot of a chosen token, LM head = identity:
    the model predicts exactly the token that ``predict(input_ids)`` names."""

    def __init__(self, vocab: int, predict):
        super().__init__(ModelConfig(vocab, vocab, 8, 1, 2, 2, max_position_embeddings=4096))
        self.predict = predict
        with torch.no_grad():
            self.lm_head.weight.copy_(3 * torch.eye(vocab))

    def hidden_states(self, input_ids, plan, final_norm=True):
        # Before or after the final norm (weight 1), the chosen logit dominates.
        return 30.0 * torch.nn.functional.one_hot(self.predict(input_ids), self.config.vocab_size).float()


def _next_token(ids):
    return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)


def _next_token_but_even_answers_wrong(ids):
    """Right everywhere except the end marker after an even final answer digit."""
    nxt = _next_token(ids)
    even_digit = (ids >= ord("0")) & (ids <= ord("9")) & ((ids - ord("0")) % 2 == 0)
    return torch.where(even_digit & (nxt == ord("\n")), ord(" "), nxt)


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory):
    cache = tmp_path_factory.mktemp("evalcache")
    return load_dataset(None, load_tokenizer(None), SEQ, split="eval", cache_dir=cache), cache


def test_eval_metrics_on_known_models(eval_split):
    ds, _ = eval_split
    vocab = load_tokenizer(None).vocab_size
    problems = ds.problems[:40]
    # Uniform logits: the loss of every token is exactly ln(vocab), no answer right
    # (the argmax tie goes to token 0, a NUL byte that no answer holds).
    uniform = build_model(ModelConfig(vocab, 32, 64, 1, 2, 2, max_position_embeddings=4096), seed=0)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    r = evaluate(uniform, ds, 4, "cpu", max_rows=6, problems=problems)
    assert r["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert r["perplexity"] == pytest.approx(vocab, rel=1e-5) and r["accuracy"] == 0.0
    # A perfect next-token oracle: loss ~ 0, perplexity ~ 1, every answer right.
    r = evaluate(_Oracle(vocab, _next_token), ds, 4, "cpu", max_rows=6, problems=problems)
    assert r["loss"] < 1e-6 and r["perplexity"] == pytest.approx(1.0, abs=1e-6)
    assert r["accuracy"] == 1.0
    # Off by one (predicts the current token): never right.
    r = evaluate(_Oracle(vocab, lambda ids: ids), ds, 4, "cpu", max_rows=6, problems=problems)
    assert r["accuracy"] == 0.0 and r["loss"] > 5
    # Wrong exactly on the problems whose answer ends in an even digit.
    want = sum(int(p.answer[-1]) % 2 for p in problems) / len(problems)
    assert 0 < want < 1
    r = evaluate(_Oracle(vocab, _next_token_but_even_answers_wrong), ds, 4, "cpu", max_rows=2,
                 problems=problems)  # fmt: skip
    assert r["accuracy"] == pytest.approx(want)


def test_eval_cli_on_a_known_checkpoint(tmp_path, eval_split, capsys):
    _, cache = eval_split
    vocab = load_tokenizer(None).vocab_size
    model = build_model(ModelConfig(vocab, 32, 64, 1, 2, 2, max_position_embeddings=4096), seed=0)
    torch.nn.init.zeros_(model.lm_head.weight)
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoint-5")
    (run / "latest").write_text("checkpoint-5\n")  # a training run directory
    argv = ["eval", str(run), "--seq-len", str(SEQ), "--cache-dir", str(cache), "--max-rows", "4",
            "--device", "cpu", "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["checkpoint"] == str(run / "checkpoint-5") and res["rows"] == 4
    assert res["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert res["accuracy"] == 0.0 and f"{math.log(vocab):.4f}" in printed
    assert main(["eval", str(tmp_path), "--cache-dir", str(cache)]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_training_with_stored_scores_equals_training_with_the_reference_model(
        tmp_path, user_data, reference_dir, stored_scores):  # fmt: skip
    """`centrifuge train --reference-scores` (no reference forward per step) and
    `--reference MODEL` (online) pick the same tokens, so they train identically."""
    data, cache = user_data
    common = ["train", "--model", "tiny", "--data", str(data), "--tokenizer", "byte", "--seq-len",
              str(SEQ), "--cache-dir", str(cache), "--batch-size", "4", "--steps", "4",
              "--select", "rho1", "--ratio", "0.4", "--eval-rows", "2", "--eval-interval", "0",
              "--device", "cpu", "--seed", "3", "--quiet"]  # fmt: skip
    assert main(common + ["--reference-scores", str(stored_scores), "--out-dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--reference", str(reference_dir), "--out-dir", str(tmp_path / "b")]) == 0

    def train_records(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        return [(r["step"], r["loss"], r["tokens_kept"]) for r in recs if r["kind"] == "train"]

    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert len(a) == 4 and [r[2] for r in a] == [r[2] for r in b]
    for (_, la, _), (_, lb, _) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)
    wa = LlamaForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4").state_dict()
    wb = LlamaForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint-4").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_experiment_plan_and_paired_report(monkeypatch, load_script, tmp_path):
    """The experiment's run list (headline first) and its paired statistics."""
    ue = load_script("utility_experiment")
    s = ue.SCALES["smoke"]
    runs = ue.plan_runs(s)
    names = [r.name for r in runs]
    assert names[:3] == ["standard-s0", "rho1-exact-r0.5-s0", "rho1-centrifuge-r0.5-s0"]
    assert len(names) == len(set(names)) == 3 * len(s.seeds) + 4 * len(s.side_seeds)
    loss = {("standard", 0): 1.0, ("standard", 1): 1.2, ("rho1-exact", 0): 0.7,
            ("rho1-exact", 1): 0.8, ("rho1-centrifuge", 0): 0.75, ("rho1-centrifuge", 1): 0.9}
    results = [dict(method=m, ratio=1.0 if m == "standard" else 0.5, seed=sd, eval_loss=v,
                    eval_accuracy=0.1, ms_per_step=20.0 if m == "rho1-centrifuge" else 30.0,
                    steps=100,
                    kept_fraction=0.5) for (m, sd), v in loss.items()]  # fmt: skip
    md = ue.to_markdown(results, s, dict(device="cpu"))
    # Δ exact − standard: −0.3, −0.4; Δ Centrifuge − exact: +0.05, +0.1; speed-up 1.5×.
    assert "| 0.5 | 2 | -0.3500 ± 0.0707 | 0.0750 ± 0.0354 | 1.50 ± 0.00× |" in md
    assert "| standard | 1 | 2 | 1.1000 ± 0.1414 |" in md
    # A knob variant: its share of Rho-1 exact's gain, paired by seed.
    results += [dict(method="rho1-centrifuge+extra0.3", ratio=0.5, seed=sd, eval_loss=v,
                     eval_accuracy=0.1, ms_per_step=24.0, steps=100 + 5 * sd, kept_fraction=0.5)
                for sd, v in ((0, 0.7), (1, 0.85))]  # fmt: skip
    md = ue.to_markdown(results, s, dict(device="cpu"))
    # shares: (1.0 − 0.7) / (1.0 − 0.7) = 100%, (1.2 − 0.85) / (1.2 − 0.8) = 87.5%;
    # 95% interval: 0.9375 ± t(1 df) 12.706 × 0.0884 / √2 = [14, 173]%; minus the amplified
    # backward's shares (0.25 / 0.3, 0.3 / 0.4): +0.167, +0.125, so 15 ± 3 points, [−12, 41]%;
    # training time (steps × median step time) 2400/3000 and 2520/3000.
    assert ("| rho1-centrifuge+extra0.3 | 0.5 | 2 | 0.0250 ± 0.0354 | 94 ± 9% | [14, 173]% | "
            "15 ± 3 [-12, 41]% | 0.80 ± 0.00 | 0.82 ± 0.03 |") in md
    assert "| rho1-centrifuge | 0.5 | 2 | 0.0750 ± 0.0354 | 79 ± 6% | [26, 132]% | — |" in md
    # Five seeds: 0.8 ± t(4 df) 2.776 × 0.0791 / √5 = [70, 90]%; one seed has no interval.
    assert ue.interval95([0.7, 0.8, 0.9, 0.75, 0.85]) == "[70, 90]%"
    assert ue.interval95([0.8]) == "—"
    # Where Rho-1 exact did not beat standard there is no gain to share.
    worse = [dict(r, eval_loss=2.0) if r["method"] == "rho1-exact" else r for r in results]
    md_worse = ue.to_markdown(worse, s, {"device": "cpu"})
    assert "| rho1-centrifuge+extra0.3 | 0.5 | 2 | -1.2250 ± 0.1061 | — |" in md_worse
    # A run from another (rebuilt) reference pairs with nothing here.
    results.append(dict(results[-1], method="rho1-centrifuge+exact2", reference_loss=0.9))
    md = ue.to_markdown(results, s, dict(device="cpu"))
    assert "| rho1-centrifuge+exact2 | 0.5 | 1 |" in md  # listed
    assert "rho1-centrifuge+exact2" not in md.split("Every Centrifuge variant")[1]  # not paired
    results.pop()
    # The Pareto table: each variant's backward and step time over dense from a bench JSON.
    bench = dict(environment=dict(device="H200"), model=dict(preset="tinyllama-1.1b", tokens_per_step=16384),
                 ratios=[dict(ratio=0.5, **{"c/a": dict(step=0.66, backward=0.51, peak=0.97)},
                              knobs={"centrifuge+extra0.3": dict(step=0.8, backward=0.7),
                                     "centrifuge+extra0.5(w1.5)": dict(step=0.87, backward=0.82)})])  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    prices = ue.bench_prices(tmp_path / "bench.json", 0.5)
    assert prices["prices"]["rho1-centrifuge+extra0.5w1.5"] == dict(step=0.87, backward=0.82)
    md = ue.to_markdown(results, s, dict(device="cpu", prices=prices))
    assert "| [14, 173]% | 15 ± 3 [-12, 41]% | 0.80 ± 0.00 | 0.82 ± 0.03 | 0.700 | 0.800 |" in md
    assert "| rho1-centrifuge | 0.5 | 2 | 0.0750 ± 0.0354 |" in md and "| 0.510 | 0.660 |" in md
    with pytest.raises(SystemExit, match="no Centrifuge timing"):
        ue.bench_prices(tmp_path / "bench.json", 0.3)


def test_experiment_shards_and_merge(monkeypatch, load_script, tmp_path):
    """One process per GPU: every run in exactly one shard, each seed of an init
    whole in one (its runs pair only with runs from the same rebuilt base);
    --merge reports the shards as one experiment and refuses shards of other
    settings."""
    ue = load_script("utility_experiment")
    s = ue.SCALES["continued-full"]
    runs = ue.plan_runs(s)
    shards = [ue.shard_runs(runs, k, 3) for k in range(3)]
    names = [r.name for sh in shards for r in sh]
    assert sorted(names) == sorted(r.name for r in runs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 4
    for sh in shards:  # whole seeds, one after the other, each in plan order
        seeds = [(r.init, r.seed) for r in sh]
        assert seeds == sorted(seeds, key=seeds.index)
        for init, seed in set(seeds):
            assert [r for r in sh if (r.init, r.seed) == (init, seed)] == \
                [r for r in runs if (r.init, r.seed) == (init, seed)]
    config = dict(ue.asdict(s))
    # Shard 2 ran shard 0's first run again from a rebuilt (so different) reference.
    for k, part in enumerate((shards[0], shards[1], shards[0][:1])):
        d = tmp_path / f"shard{k}"
        d.mkdir()
        meta = dict(config=config, skipped=[r.name for r in part[1:]], failed=[],
                    reference_eval=dict(loss=0.5 if k < 2 else 0.6))  # fmt: skip
        run = dict(name=part[0].name, reference_loss=meta["reference_eval"]["loss"])
        (d / "results.json").write_text(json.dumps(dict(meta=meta, runs=[run])))
    merged = ue.merge_results([tmp_path / f"shard{k}" for k in range(3)])
    assert [r["name"] for r in merged["runs"]] == [shards[0][0].name, shards[1][0].name, shards[0][0].name]
    assert len(merged["meta"]["skipped"]) == len(shards[0]) + len(shards[1]) - 2
    assert [r["reference"] for r in merged["meta"]["rebuilds"]] == [0.5, 0.6]
    other = json.loads((tmp_path / "shard1" / "results.json").read_text())
    other["meta"]["config"]["steps"] += 1
    (tmp_path / "shard1" / "results.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other scale settings"):
        ue.merge_results([tmp_path / "shard0", tmp_path / "shard1"])
    with pytest.raises(SystemExit, match="K must be"):
        ue.parse_shard("2/2")


def test_continued_training_mode_end_to_end(monkeypatch, load_script, tmp_path):
    """The continued-training pipeline at miniature size: base on general text,
    reference from the base, runs from the base (with knobs) and from scratch,
    checkpoints pruned, results in --out; a second call with --runs reuses the
    base and reports the first call's runs."""
    ue = load_script("utility_experiment")
    s = ue.SCALES["continued-smoke"]
    tiny = dict(steps=3, ref_steps=2, base_steps=3, train_docs=30, clean_docs=30, base_corpus_docs=10,
                eval_rows=2, eval_problems=3, seq_len=64, batch_size=2, warmup=1, evals=1)  # fmt: skip
    for k, v in tiny.items():
        monkeypatch.setattr(s, k, v)
    monkeypatch.setattr(s, "equal_time", True)
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--scale", "continued-smoke", "--out", str(out), "--work", str(work), "--seeds", "0",
              "--side-seeds", "--prune", "--knobs", "extra=0.3", "backward_ratio=0.7"]  # fmt: skip
    assert ue.main(common + ["--runs", "cont-*"]) == 0
    first = json.loads((out / "results.json").read_text())
    names = {r["name"] for r in first["runs"]}
    assert names == {"cont-standard-s0", "cont-rho1-exact-r0.5-s0", "cont-rho1-centrifuge-r0.5-s0",
                     "cont-rho1-centrifuge-eqtime-r0.5-s0", "cont-rho1-centrifuge+extra0.3-r0.5-s0",
                     "cont-rho1-centrifuge+backward0.7-r0.5-s0"}  # fmt: skip
    by = {r["name"]: r for r in first["runs"]}
    # Equal time: the steps that Rho-1 exact's step time buys Centrifuge, from the same seed's runs.
    exact, amp = by["cont-rho1-exact-r0.5-s0"], by["cont-rho1-centrifuge-r0.5-s0"]
    assert by["cont-rho1-centrifuge-eqtime-r0.5-s0"]["steps"] == max(
        1, round(s.steps * exact["ms_per_step"] / amp["ms_per_step"]))
    assert (out / "curves-tokens.png").is_file() and (out / "curves-time.png").is_file()
    assert all(r["init"] == "base" for r in first["runs"])
    # The final models' loss by kind of token, and what Rho-1 keeps of each kind.
    by_type = by["cont-rho1-exact-r0.5-s0"]["by_type"]
    assert set(by_type) <= set(corpus.TOKEN_TYPES) and "answer" in by_type
    assert all(0.0 <= v["kept"] <= 1.0 and v["loss"] > 0 for v in by_type.values())
    assert "| kind | tokens | kept | standard | Rho-1 exact | Centrifuge |" in (out / "results.md").read_text()
    assert "stdlib docs" in first["meta"]["base"]["text"]
    assert set(first["meta"]["gradient_check"]) == {"amplified", "exact", "extra=0.3", "backward_ratio=0.7"}
    assert max(first["meta"]["gradient_check"].values()) < 1e-5
    assert not list(work.glob("runs/*/checkpoint-*"))  # pruned
    assert (out / "runs" / "cont-standard-s0" / "metrics.jsonl").is_file()
    stamp = (work / "base" / "latest").stat().st_mtime_ns
    assert ue.main(common + ["--runs", "standard-s0"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in second["runs"]} == names | {"standard-s0"}
    assert (work / "base" / "latest").stat().st_mtime_ns == stamp
    md = (out / "results.md").read_text()
    assert "**Continued training from the pretrained base**" in md and "**From scratch**" in md
    assert "rho1-exact-r0.5-s0" in second["meta"]["skipped"]
    # A GPU machine hands back only the top level: results.json alone marks runs done.
    shutil.rmtree(out / "runs")
    assert ue.main(common + ["--runs", "standard-s0"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert third["runs"] == second["runs"]  # reported, not retrained


def test_general_prose_is_the_stdlib_documentation():
    """The base model's general text: docstrings parsed from the interpreter's
    own sources and the pydoc topics, in a fixed order, nothing imported."""
    import sys

    from centrifuge.data import prose

    docs = prose.stdlib_documents()
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in docs)  # json/__init__.py
    assert "antigravity" not in sys.modules  # parsed, never imported
    assert prose.fingerprint().endswith("stdlib docs")


def test_schedule_knobs_become_train_options(load_script):
    """--knobs takes centrifuge train's exact-backward schedules, alone or with a
    BackwardOptions knob; bad values fail before any training."""
    ue = load_script("utility_experiment")
    knob_method, knob_options = ue.knob_method, ue.knob_options

    assert knob_method("exact_every=4") == "rho1-centrifuge+every4"
    assert knob_method("kv_projections=1,exact_final=0.2") == "rho1-centrifuge+kvproj+final0.2"
    opts = knob_options("exact_final=0.2,backward_ratio=0.7")
    assert opts["exact_final"] == 0.2 and opts["backward_ratio"] == 0.7 and "exact_every" not in opts
    for bad in ("exact_every=0", "exact_final=1.5", "exact_every=x"):
        with pytest.raises(ValueError, match="bad schedule option"):
            knob_options(bad)


def test_cuda_graphs_reach_the_compared_runs_and_old_results_still_count(load_script, tmp_path, monkeypatch):
    """--cuda-graphs: every compared run trains captured (the base and the
    reference do not: they stay the same with or without); a results.json saved
    before the option existed still describes eager runs."""
    ue = load_script("utility_experiment")
    eager = dataclasses.replace(ue.SCALES["smoke"])
    captured = dataclasses.replace(eager, cuda_graphs=True)
    seen = []

    class Trained(Exception):
        pass

    def fake_train(cfg, progress):
        seen.append(cfg)
        raise Trained

    monkeypatch.setattr(ue, "train", fake_train)
    for s in (eager, captured):
        for spec in ue.plan_runs(s)[:3]:  # standard, Rho-1 exact, Centrifuge
            with pytest.raises(Trained):
                ue.run_one(spec, s, tmp_path / "d.jsonl", tmp_path / "scores", tmp_path / "out",
                           tmp_path / "cache", None)  # fmt: skip
    assert [c.cuda_graphs for c in seen] == [False] * 3 + [True] * 3
    assert ue.parse_args(["--cuda-graphs"]).cuda_graphs and not ue.parse_args([]).cuda_graphs

    old = {k: v for k, v in dataclasses.asdict(eager).items() if k != "cuda_graphs"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(dict(meta=dict(config=old), runs=[])))
    assert ue.earlier_saved(tmp_path / "old", eager)["meta"]["config"] == old
    assert ue.earlier_saved(tmp_path / "old", captured) == {}
    gone = dict(old, removed_field=1)  # a field since removed: those runs trained otherwise
    (tmp_path / "old" / "results.json").write_text(json.dumps(dict(meta=dict(config=gone), runs=[])))
    assert ue.earlier_saved(tmp_path / "old", eager) == {}
