"""The built-in default corpus: math word problems with worked solutions and
answers, in which a share of the spans is noise (web boilerplate, garbled
text, page furniture with random numbers). Deterministic from a seed.

Splits
------
``train``  documents of 2-4 problems with noise spans between and inside them
           (about a third of the characters are noise): the data token
           filtering should learn to skip.
``clean``  the same kind of problems without noise (for training a reference
           model, as Rho-1 does with its high-quality reference data).
``eval``   clean held-out problems, one per document, from a separate random
           stream; no training text contains its word problems (the one-digit
           drills are a table of facts that training text shares). :func:`heldout_problems` gives them as prompt/answer pairs
           for :func:`answer_accuracy`.

Every problem ends ``Answer: <number>`` followed by a newline (the end marker).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

VERSION = 3  # bump when the generator changes: it keys the token cache
SPLITS = ("train", "clean", "eval")
# Sizes chosen so the default training run sees mostly unseen text and the eval
# is cheap: about 2.4 MB of training text, 300 held-out problems.
NUM_DOCS = {"train": 4000, "clean": 3000, "eval": 300}
ANSWER_PREFIX = "Answer: "
DRILL_SHARE = 0.3  # share of one-digit mental-arithmetic problems
END_MARKER = "\n"

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai",
          "Lena", "Milo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic"]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins", "cookies", "cards",
          "shells", "stamps", "balloons", "buttons"]
_BOILERPLATE = [
    "Subscribe to our newsletter for more math tips!",
    "Copyright (c) 2021 MathHelp Online. All rights reserved.",
    "Click here to share: Facebook | Twitter | Email | Print",
    "This site uses cookies to improve your experience. Accept all cookies?",
    "Advertisement - continue reading below",
    "Home > Worksheets > Grade 4 > Word Problems",
    "Sign in to save your progress. Forgot password?",
    "Related posts: Fractions made easy | Times tables | Long division",
    "Disclaimer: solutions are provided for educational purposes only.",
    "Download the PDF version of this worksheet (free for members).",
]  # fmt: skip
_GARBLE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#@%&*~^|<>{}[]=+-_;:/"


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` is the text up to and including ``"Answer: "``
    (question and worked solution); ``answer`` the number as text."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer + END_MARKER

    @property
    def question(self) -> str:
        """The question, without its ``Problem: `` label."""
        return _question(self).removeprefix("Problem: ")

    @property
    def solution(self) -> str:
        """The worked solution, without its ``Solution: `` label ("" for a drill)."""
        lines = self.prompt.split("\n")
        return lines[1].removeprefix("Solution: ") if len(lines) > 2 else ""

    @property
    def is_drill(self) -> bool:
        """One-digit mental arithmetic (:func:`_drill`): no worked solution."""
        return self.prompt.startswith("Problem: What is ")


def _problem(rng: random.Random) -> Problem:
    if rng.random() < DRILL_SHARE:
        return _drill(rng)
    kind = rng.randrange(6)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        s, ans = f"{a} + {b} = {a + b}.", a + b
    elif kind == 1:
        b, a = rng.randint(2, 40), rng.randint(45, 99)
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        s, ans = f"{a} - {b} = {a - b}.", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there?"
        s, ans = f"{a} * {b} = {a * b}.", a * b
    elif kind == 3:
        a, x, b = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 30)
        c = a * x + b
        q = f"Solve for x: {a}x + {b} = {c}."
        s, ans = f"{a}x = {c} - {b} = {c - b}. x = {c - b} / {a} = {x}.", x
    elif kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = (f"{name} buys {a} packs of {b} {item} and loses {c} of them. "
             f"How many {item} does {name} keep?")  # fmt: skip
        s, ans = f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c
    else:
        b, x = rng.randint(2, 9), rng.randint(2, 12)
        a = b * x
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each get?"
        s, ans = f"{a} / {b} = {x}.", x
    return Problem(f"Problem: {q}\nSolution: {s}\n{ANSWER_PREFIX}", str(ans))


def _drill(rng: random.Random) -> Problem:
    """Mental arithmetic with one-digit numbers: the answer follows from the
    question alone (a table of facts), so it is learnable in a short run."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    op = rng.choice("+*")
    return Problem(f"Problem: What is {a} {op} {b}?\n{ANSWER_PREFIX}", str(a + b if op == "+" else a * b))


def _noise(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(_BOILERPLATE)
    if kind == 1:
        return "".join(rng.choice(_GARBLE) for _ in range(rng.randint(20, 90)))
    return (f"Page {rng.randint(1, 40)} of {rng.randint(40, 99)} | Views: {rng.randint(100, 99999)}"
            f" | Posted {rng.randint(2005, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")


# Kinds of character in a problem's text (:func:`char_types`): the question's
# numbers are random, so no model predicts them well and Rho-1's excess loss
# filters them, while the solution and the answer must read them through
# attention.
TOKEN_TYPES = ("question digits", "question words", "solution digits", "solution words", "answer")


def char_types(p: Problem) -> list[str]:
    """One of :data:`TOKEN_TYPES` for every character of ``p.text``: the
    question line, the rest of the prompt (the worked solution and
    ``"Answer: "``; a drill has no solution), then the answer and its end
    marker."""
    question = len(_question(p)) + 1  # with its newline
    kinds = []
    for i, ch in enumerate(p.prompt):
        part = "question" if i < question else "solution"
        kinds.append(f"{part} {'digits' if ch.isdigit() else 'words'}")
    return kinds + ["answer"] * (len(p.answer) + len(END_MARKER))


def _question(p: Problem) -> str:
    return p.prompt.split("\n", 1)[0]


@functools.lru_cache(maxsize=8)
def _heldout_questions(seed: int) -> frozenset:
    """Word problems of the eval split; training text never contains them
    (drills, a table of one-digit facts, are shared on purpose)."""
    return frozenset(_question(p) for p in heldout_problems(seed) if not p.is_drill)


def _training_problem(rng: random.Random, seed: int) -> Problem:
    held = _heldout_questions(seed)
    while True:
        p = _problem(rng)
        if p.is_drill or _question(p) not in held:
            return p


def _train_document(rng: random.Random, seed: int) -> str:
    parts = []
    for _ in range(rng.randint(2, 4)):
        while rng.random() < 0.55:  # noise spans between problems
            parts.append(_noise(rng) + "\n")
        p = _training_problem(rng, seed)
        if rng.random() < 0.2:  # noise inside a problem, after the question line
            head, rest = p.prompt.split("\n", 1)
            parts.append(f"{head}\n{_noise(rng)}\n{rest}{p.answer}{END_MARKER}")
        else:
            parts.append(p.text)
    if rng.random() < 0.5:
        parts.append(_noise(rng) + "\n")
    return "".join(parts)


def _rng(seed: int, split: str) -> random.Random:
    # A separate stream per split, so the held-out problems never depend on
    # (and rarely coincide with) the training text.
    return random.Random(f"centrifuge-corpus/{split}/{seed}")


def heldout_problems(seed: int = 0, n: int | None = None) -> list[Problem]:
    """The clean held-out problems of the ``eval`` split, in document order."""
    rng = _rng(seed, "eval")
    return [_problem(rng) for _ in range(NUM_DOCS["eval"] if n is None else n)]


def word_problems(stream: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` word problems (no drills) from a random stream of their own, named
    ``stream`` (not a split's name), none of them a word problem of the eval
    split of ``seed`` (:func:`heldout_problems`): the corpus' generator as a
    source of task sets in other formats (e.g. instruction tuning)."""
    if stream in SPLITS:
        raise ValueError(f"stream {stream!r} is a split of the corpus; name another stream")
    rng, out = _rng(seed, stream), []
    while len(out) < n:
        p = _training_problem(rng, seed)
        if not p.is_drill:
            out.append(p)
    return out


def documents(split: str = "train", seed: int = 0, n: int | None = None) -> list[str]:
    """The built-in corpus' documents of ``split`` ("train", "clean" or "eval")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the built-in corpus; choose one of {SPLITS}")
    n = NUM_DOCS[split] if n is None else n
    if split == "eval":
        return [p.text for p in heldout_problems(seed, n)]
    rng = _rng(seed, split)
    if split == "clean":
        return ["".join(_training_problem(rng, seed).text for _ in range(rng.randint(2, 4)))
                for _ in range(n)]  # fmt: skip
    return [_train_document(rng, seed) for _ in range(n)]


@torch.no_grad()
def answer_accuracy(model, tokenizer, problems: list[Problem], device="cpu",
                    batch_size: int = 32) -> float:  # fmt: skip
    """Fraction of problems whose answer the model gets exactly right: with
    teacher forcing, the argmax prediction at every answer token and at the
    end marker must equal it (the same as greedy decoding of the answer, with
    one forward). model: a native LlamaForCausalLM."""
    if not problems:
        raise ValueError("answer_accuracy needs at least one problem")
    was_training = model.training
    model.eval()
    correct = 0
    from centrifuge.models.tensor_parallel import local

    weight = local(model.lm_head.weight)  # replicated under tensor parallelism
    # Tensor parallelism splits a forward's rows evenly over its ranks.
    multiple = 1 if getattr(model, "tp", None) is None else model.tp.size
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [tokenizer.encode(p.prompt) for p in chunk]
        targets = [tokenizer.encode(p.answer + END_MARKER) for p in chunk]
        seqs = [a + b for a, b in zip(prompts, targets)]
        L = max(len(s) for s in seqs)
        if L > model.config.max_position_embeddings:
            raise ValueError(f"a problem has {L} tokens, more than the model supports")
        L = -(-L // multiple) * multiple
        ids = torch.full((len(seqs), L), tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        h = model(ids.to(device), attention_mask=mask.to(device)).hidden
        for i, (p, t) in enumerate(zip(prompts, targets)):
            rows = h[i, len(p) - 1 : len(p) - 1 + len(t)]  # row j predicts token j + 1
            pred = (rows @ weight.to(rows.dtype).t()).argmax(-1).cpu()
            correct += bool((pred == torch.tensor(t)).all())
    model.train(was_training)
    return correct / len(problems)
