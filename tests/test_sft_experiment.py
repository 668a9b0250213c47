"""scripts/sft_experiment.py: the instruction sets, packing and held-out metrics
against unpacked references, and the whole experiment at a micro scale (the
ρ = 1 Centrifuge run reproduces plain SFT; the report is written; finished
runs are reused)."""

import json

import pytest
import torch

from centrifuge import build_model, get_preset
from centrifuge.data import load_tokenizer, prose

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def se(load_script):
    return load_script("sft_experiment")


def test_instruction_sets_are_disjoint_and_mostly_prompt(se, monkeypatch):
    s = se.SCALES["smoke"]
    monkeypatch.setattr(s, "train_problems", 300)
    tok = load_tokenizer("byte")
    train, held = se.instruction_sets(s, tok)
    assert len(train) == 300 and len(held) == s.eval_problems
    text = [tok.decode(e.prompt + e.completion) for e in train]
    held_text = {tok.decode(e.prompt) for e in held}
    assert not held_text & {tok.decode(e.prompt) for e in train}
    assert all("### Instruction\n" in t and "\nFinal answer: " in t and "Problem:" not in t for t in text)
    # The answer (and the end token) closes the completion; numbers of the prompt reappear in it.
    for e in train:
        answer = tok.decode(e.completion[-e.answer : -1])
        assert e.completion[-1] == tok.eos_id and tok.decode(e.completion).endswith(f"answer: {answer}")
        assert any(w.strip(".?") in tok.decode(e.completion) for w in tok.decode(e.prompt).split()
                   if w.strip(".?").isdigit())  # fmt: skip
    share = sum(len(e.prompt) for e in train) / sum(len(e.prompt) + len(e.completion) for e in train)
    assert share > 0.7


def test_packing_labels_completions_only(se):
    tok = load_tokenizer("byte")
    exs = [se.Example([1, 2, 3], [4, 5, tok.eos_id], 2), se.Example([6] * 4, [7, tok.eos_id], 2),
           se.Example([8] * 5, [9, tok.eos_id], 1)]  # fmt: skip
    rows = se.pack(exs, 12, tok.pad_id)
    assert len(rows) == 2  # 6 + 6 tokens, then 7
    assert rows.input_ids[0].tolist() == [1, 2, 3, 4, 5, 256, 6, 6, 6, 6, 7, 256]
    assert rows.labels[0].tolist() == [-100] * 3 + [4, 5, 256] + [-100] * 4 + [7, 256]
    assert rows.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert rows.example[1].tolist() == [2] * 7 + [-1] * 5
    assert rows.answer[0].nonzero().flatten().tolist() == [4, 5, 10, 11]
    assert rows.labels[1, 7:].eq(-100).all() and rows.input_ids[1, 7:].eq(tok.pad_id).all()
    with pytest.raises(ValueError, match="more than seq_len"):
        se.pack(exs, 6, tok.pad_id)


def test_held_out_metrics_against_greedy_decoding(se):
    """Completions that greedy decoding of the model writes (each prompt alone,
    unpacked) count as exact matches once packed together; one wrong answer
    token fails both metrics, a wrong solution token exact match only."""
    s = se.SCALES["smoke"]
    model = build_model(get_preset("tiny"), seed=3)
    tok = load_tokenizer("byte")

    def greedy(prompt, n):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt) :]

    prompts = [tok.encode(t) for t in ("### Instruction\n3 + 4", "Solve 12 * 3", "x = 7 - 2", "ab")]
    exs = []
    for k, p in enumerate(prompts):
        c = greedy(p, 6)
        if k == 1:  # the last (answer) token wrong
            c[-1] = (c[-1] + 1) % 256
        if k == 2:  # the first (solution) token wrong, the rest as greedy continues it
            c = [(c[0] + 1) % 256]
            c += greedy(p + c, 5)
        exs.append(se.Example(p, c, 2))
    held = se.pack(exs, 40, tok.pad_id)
    assert len(held) < len(exs)  # packed: examples share rows
    r = se.evaluate_sft(model, held, len(exs), s)
    assert r["exact_match"] == 0.5 and r["answer_accuracy"] == 0.75
    # The loss: the mean completion-token loss of the examples, each alone.
    losses = []
    for e in exs:
        ids = torch.tensor([e.prompt + e.completion])
        logp = torch.log_softmax(model.logits(ids)[0, len(e.prompt) - 1 : -1], -1)
        losses += (-logp[torch.arange(len(e.completion)), torch.tensor(e.completion)]).tolist()
    assert r["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_experiment_end_to_end(se, monkeypatch, tmp_path):
    s = se.SCALES["smoke"]
    micro = dict(steps=4, base_steps=3, train_problems=40, eval_problems=12, base_corpus_docs=10,
                 batch_size=2, warmup=1)  # fmt: skip
    for k, v in micro.items():
        monkeypatch.setattr(s, k, v)
    # The base's general text: a few lines instead of the standard library's docs (seconds to parse).
    monkeypatch.setattr(prose, "stdlib_documents", lambda: ("Return the sum of a and b.\n" * 40,) * 10)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--scale", "smoke", "--out", str(out), "--work", str(work), "--seeds", "0"]
    assert se.main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    by = {(r["method"], r["ratio"]): r for r in saved["runs"]}
    assert set(by) == {("plain-sft", 1.0), ("centrifuge", 1.0)} | {
        (m, r) for m in ("masked-loss", "centrifuge", "centrifuge-constant") for r in (0.5, 0.7)}
    # ρ = 1 with context rows in the backward is plain SFT (the compact path on the CPU).
    plain, check = by["plain-sft", 1.0], by["centrifuge", 1.0]
    assert check["backward"] == "amplified (compact path)" and check["weight_difference"] < 1e-4
    assert check["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    # Selection differs from plain SFT; Centrifuge follows masked-loss selection closely
    # in 4 steps, and context=backward runs the prompt rows' backward, constant not.
    masked, amp, const = by["masked-loss", 0.5], by["centrifuge", 0.5], by["centrifuge-constant", 0.5]
    assert abs(masked["eval_loss"] - plain["eval_loss"]) > 1e-3
    assert abs(amp["eval_loss"] - masked["eval_loss"]) < abs(masked["eval_loss"] - plain["eval_loss"])
    assert masked["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    assert masked["backward_rows"] == 1.0
    assert const["backward_rows"] < plain["completion_share"] < amp["backward_rows"] < 1
    md = (out / "results.md").read_text()
    assert "| centrifuge-constant | 0.5 | 1 |" in md and "Check, Centrifuge at ρ = 1" in md
    assert (out / "sft.png").is_file() and saved["meta"]["base_sft_eval"]["loss"] > 0
    # A second call reuses every run; the report can be rewritten from results.json.
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("runs/*/result.json")}
    assert se.main(argv) == 0
    assert stamps == {f: f.stat().st_mtime_ns for f in out.glob("runs/*/result.json")}
    assert json.loads((out / "results.json").read_text())["runs"] == saved["runs"]
    # A run from another base (a rebuilt one, on a GPU) is trained again.
    f = out / "runs" / "plain-sft-s0" / "result.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), base_fingerprint=0.0)))
    assert se.main(argv) == 0
    assert [g for g in stamps if g.stat().st_mtime_ns != stamps[g]] == [f]
    md = (out / "results.md").read_text()
    (out / "results.md").unlink()
    assert se.main(argv + ["--report-only"]) == 0 and (out / "results.md").read_text() == md
