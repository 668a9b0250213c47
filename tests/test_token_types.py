"""Held-out loss by kind of token (question digits and words, solution digits
and words, answer) and Rho-1's kept share of each kind, against a direct
per-problem computation."""

import random

import pytest
import torch
import torch.nn.functional as F

from centrifuge import build_model, get_preset
from centrifuge.data import corpus, load_tokenizer
from centrifuge.evaluation import loss_by_token_type


def test_char_types_of_a_problem():
    p = corpus.Problem("Problem: Ava has 12 coins and gets 3 more. How many coins does Ava have now?\n"
                       "Solution: 12 + 3 = 15.\nAnswer: ", "15")  # fmt: skip
    kinds = corpus.char_types(p)
    assert len(kinds) == len(p.text)
    q = p.text.index("\n") + 1
    assert {kinds[i] for i in range(q) if p.text[i].isdigit()} == {"question digits"}
    assert kinds[p.text.index("12")] == "question digits" and kinds[0] == "question words"
    assert kinds[q + p.text[q:].index("15")] == "solution digits"
    assert kinds[p.text.index("Answer")] == "solution words"
    assert kinds[-3:] == ["answer"] * 3  # "15" and the end marker
    for p in corpus.heldout_problems(0, 50):  # drills too
        assert len(corpus.char_types(p)) == len(p.text)


def _direct(model, tok, problems):
    """Per-problem forward, no padding: every token's loss and kind."""
    losses, kinds = [], []
    for p in problems:
        ids = torch.tensor([tok.encode(p.text)])
        h = model(ids).hidden[0, :-1]
        losses.append(F.cross_entropy(h @ model.lm_head.weight.t(), ids[0, 1:], reduction="none"))
        kinds += corpus.char_types(p)[1:]
    return torch.cat(losses).double(), kinds


@torch.no_grad()
def test_loss_by_token_type_matches_a_direct_computation():
    seed = random.randrange(10_000)
    tok = load_tokenizer("byte")
    problems = corpus.heldout_problems(seed % 7, 13)  # odd count: a short last batch
    model = build_model(get_preset("tiny"), seed=seed)
    reference = build_model(get_preset("tiny"), seed=seed + 1)
    got = loss_by_token_type(model, tok, problems, reference=reference, ratio=0.4, batch_size=5)
    loss, kinds = _direct(model, tok, problems)
    excess = loss - _direct(reference, tok, problems)[0]
    keep = torch.zeros(len(loss), dtype=torch.bool)
    keep[excess.topk(round(0.4 * len(loss))).indices] = True
    assert sum(v["tokens"] for v in got.values()) == len(loss)
    for name, v in got.items():
        sel = torch.tensor([k == name for k in kinds])
        assert v["tokens"] == int(sel.sum())
        assert v["loss"] == pytest.approx(float(loss[sel].mean()), rel=1e-5)
        # batched and per-problem losses differ in the last bits: a tie at the
        # top-k boundary may flip one token
        assert v["kept"] == pytest.approx(float(keep[sel].double().mean()), abs=1.01 / v["tokens"])
    assert set(got) == set(corpus.TOKEN_TYPES)
    assert "kept" not in loss_by_token_type(model, tok, problems)["answer"]


def test_loss_by_token_type_errors():
    tok = load_tokenizer("byte")
    model = build_model(get_preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="at least one problem"):
        loss_by_token_type(model, tok, [])
    with pytest.raises(ValueError, match="both a reference model and a ratio"):
        loss_by_token_type(model, tok, corpus.heldout_problems(0, 2), ratio=0.5)
