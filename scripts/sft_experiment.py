"""SFT experiment: what Centrifuge does to supervised fine-tuning quality.

    python scripts/sft_experiment.py --scale smoke                  # CPU, ~4 minutes
    python scripts/sft_experiment.py --scale full --work /tmp/sft   # one GPU, ~6 minutes
    python scripts/sft_experiment.py --scale full --report-only     # rewrite the report

1. **Base**: a byte-level model pretrained in the script, deterministically
   (utility_experiment's base: the standard library's documentation mixed
   with built-in corpus documents, whose problems read ``Problem: …
   Solution: … Answer: N``).
2. **Instruction set** from the corpus' problem generator in another format:
   prompt = an instruction header and the question, completion = the worked
   solution, ``Final answer: N`` and the end-of-text token. Labels are -100 on
   the prompt (completion-only loss). The prompt is most of every example
   (~80% of its tokens) and the answer follows from the prompt's numbers, so
   the prompt tokens' K and V matter. Training problems come from a stream of
   their own (:func:`centrifuge.data.corpus.word_problems`); the held-out set is
   the word problems of the corpus' eval split, which neither the training set
   nor the base's documents contain. Examples are packed whole into rows
   (``position_ids`` restart at every example).
3. **Runs** from the base, all at the same token budget, the same steps and, per
   seed, the same data order (paired): plain SFT (every completion token);
   masked-loss token selection (``backward="exact"``, top-ρ completion tokens
   by loss, the baseline); Centrifuge with the same selection and context rows
   in the backward (``context="backward"``, the default) and as constants
   (``context="constant"``), at every ρ of the scale; and Centrifuge at ρ = 1
   with ``context="backward"``, which must reproduce plain SFT (a check: the
   report gives the loss difference and the final weights' difference as a
   share of the fine-tuning update).
4. **Held-out metrics**: completion loss (mean over completion tokens), exact
   match (teacher forced: the argmax at every completion token is that token,
   i.e. greedy decoding writes the whole completion), answer accuracy (the
   same on the final answer and the end token only), median step time and the
   share of tokens in the layers' backward set. results.json, results.md
   (with paired differences per seed against masked-loss selection at the same
   ρ and against plain SFT) and sft.png go to ``--out``.

Finished runs are reused when the script runs again with the same settings
and base (per-run ``runs/NAME/result.json``, or ``results.json`` alone: a GPU
machine may hand back only the top level; a base rebuilt on a GPU differs, so
its runs start over); ``--fresh`` starts over. The base, the token cache and plain SFT's final weights (for the
ρ = 1 check) go to ``--work`` (default: ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

# Runs as a file: make the checkout and utility_experiment importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utility_experiment as ue  # noqa: E402
from centrifuge import BackwardOptions, Selector  # noqa: E402
from centrifuge.data import corpus, load_dataset, load_tokenizer  # noqa: E402
from centrifuge.models import LlamaForCausalLM  # noqa: E402
from centrifuge.ops.linear_ce import IGNORE_INDEX  # noqa: E402
from centrifuge.training.schedule import WarmupCosine  # noqa: E402


@dataclass
class Scale:
    model: str  # preset
    device: str
    dtype: str
    seq_len: int
    batch_size: int  # packed rows per step
    steps: int  # SFT steps of every run
    lr: float
    warmup: int
    train_problems: int  # instruction examples (a run may see them more than once)
    base_steps: int
    base_lr: float
    base_corpus_docs: int  # built-in corpus documents in the base's text
    eval_problems: int | None = None  # held-out word problems (None: all of the eval split's)
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.7])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int | None = None  # CPU intra-op threads


SCALES = {
    # A 2-layer, 64-wide model for a few minutes of CPU: checks the pipeline, not evidence.
    "smoke": Scale(model="tiny", device="cpu", dtype="fp32", seq_len=256, batch_size=8, steps=40,
                   lr=2e-3, warmup=4, train_problems=1000, base_steps=200, base_lr=3e-3,
                   base_corpus_docs=400, eval_problems=100, threads=1),
    # One GPU, ~6 minutes with the base: 4 layers, d = 256, 300 steps x 16 x 512 tokens.
    "full": Scale(model="small", device="cuda", dtype="bf16", seq_len=512, batch_size=16, steps=300,
                  lr=1e-3, warmup=30, train_problems=6000, base_steps=1000, base_lr=3e-3,
                  base_corpus_docs=2000),
}  # fmt: skip

# The instruction format: not the base's "Problem: ... Solution: ... Answer: N".
PROMPT = ("Below is a math word problem. Show the arithmetic, then give the final answer.\n"
          "### Instruction\n{question}\n### Response\n")  # fmt: skip
COMPLETION = "{solution}\nFinal answer: {answer}"
PLAIN, MASKED, CENTRIFUGE, CONSTANT = "plain-sft", "masked-loss", "centrifuge", "centrifuge-constant"
METHODS = {  # method: its backward mode, and what it is
    PLAIN: ("exact", "plain SFT: every completion token"),
    MASKED: ("exact", "masked-loss token selection (top-ρ completion tokens by loss)"),
    CENTRIFUGE: ("amplified", "Centrifuge, context rows in the backward (context=backward)"),
    CONSTANT: ("amplified", "Centrifuge, context rows constant (context=constant)"),
}


# --- data ----------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized instruction example: ``answer`` = how many of the
    completion's last tokens are the final answer and the end token."""

    prompt: list[int]
    completion: list[int]
    answer: int


def instruction_example(p: corpus.Problem, tok) -> Example:
    prompt = tok.encode(PROMPT.format(question=p.question))
    completion = tok.encode(COMPLETION.format(solution=p.solution, answer=p.answer)) + [tok.eos_id]
    return Example(prompt, completion, len(tok.encode(p.answer)) + 1)


def instruction_sets(s: Scale, tok) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: disjoint word problems (no drills, whose
    one-digit facts the corpus shares between its splits on purpose)."""
    held = [p for p in corpus.heldout_problems(0) if not p.is_drill][: s.eval_problems]
    train = corpus.word_problems("instruction", s.train_problems, seed=0)
    return [instruction_example(p, tok) for p in train], [instruction_example(p, tok) for p in held]


@dataclass
class Rows:
    """Examples packed into rows of ``seq_len`` tokens, each whole inside one row.
    All [R, L] tensors: ``input_ids``, ``labels`` (-100 on prompts and padding),
    ``position_ids`` (restarting at every example and at the padding, which so
    forms its own segment), ``example`` (index into the packed list, -1 on
    padding), ``answer`` (bool: the final answer's tokens and the end token)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    example: torch.Tensor
    answer: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Rows":
        return Rows(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def pack(examples: list[Example], seq_len: int, pad_id: int) -> Rows:
    """Greedy packing in the given order: an example that does not fit the rest
    of a row starts the next one."""
    rows, row, used = [], [], 0
    for i, ex in enumerate(examples):
        n = len(ex.prompt) + len(ex.completion)
        if n > seq_len:
            raise ValueError(f"an instruction example has {n} tokens, more than seq_len {seq_len}")
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append((i, ex))
        used += n
    rows.append(row)
    out = dict(input_ids=torch.full((len(rows), seq_len), pad_id),
               labels=torch.full((len(rows), seq_len), IGNORE_INDEX),
               position_ids=torch.zeros(len(rows), seq_len, dtype=torch.long),
               example=torch.full((len(rows), seq_len), -1),
               answer=torch.zeros(len(rows), seq_len, dtype=torch.bool))  # fmt: skip
    for r, row in enumerate(rows):
        at = 0
        for i, ex in row:
            ids = ex.prompt + ex.completion
            end, c = at + len(ids), at + len(ex.prompt)
            out["input_ids"][r, at:end] = torch.tensor(ids)
            out["labels"][r, c:end] = torch.tensor(ex.completion)
            out["position_ids"][r, at:end] = torch.arange(len(ids))
            out["example"][r, at:end] = i
            out["answer"][r, end - ex.answer : end] = True
            at = end
        out["position_ids"][r, at:] = torch.arange(seq_len - at)
    return Rows(**out)


def training_rows(examples: list[Example], s: Scale, seed: int, pad_id: int) -> Rows:
    """``steps x batch_size`` rows: epoch after epoch of the examples, each
    epoch in its own order drawn from ``seed`` (the same for every method)."""
    parts, n, epoch = [], 0, 0
    while n < s.steps * s.batch_size:
        order = list(range(len(examples)))
        random.Random(f"sft/{seed}/{epoch}").shuffle(order)
        parts.append(pack([examples[i] for i in order], s.seq_len, pad_id))
        n, epoch = n + len(parts[-1]), epoch + 1
    cat = Rows(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rows)})
    return cat.rows(0, s.steps * s.batch_size)


# --- runs ----------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    method: str
    ratio: float
    seed: int


def plan_runs(s: Scale) -> list[RunSpec]:
    """Seed by seed (a cut-off run leaves whole seeds): plain SFT, the ρ = 1
    check, then every selection method at every ρ."""
    runs = []
    for seed in s.seeds:
        runs += [RunSpec(f"{PLAIN}-s{seed}", PLAIN, 1.0, seed),
                 RunSpec(f"{CENTRIFUGE}-r1-s{seed}", CENTRIFUGE, 1.0, seed)]  # fmt: skip
        for r in s.ratios:
            runs += [RunSpec(f"{m}-r{r:g}-s{seed}", m, r, seed) for m in (MASKED, CENTRIFUGE, CONSTANT)]
    return runs


def backward_of(method: str) -> str | BackwardOptions:
    if METHODS[method][0] == "exact":
        return "exact"
    return BackwardOptions(context="constant" if method == CONSTANT else "backward")


def autocast(s: Scale):
    return torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")


def fine_tune(spec: RunSpec, s: Scale, base: Path, rows: Rows) -> tuple[LlamaForCausalLM, dict]:
    """Train from the base: AdamW, warm-up + cosine, gradient clipping at 1.
    Returns the model and the run's training statistics."""
    device = torch.device(s.device)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM.from_pretrained(base).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(s.warmup, s.steps, 0.1))
    selector = Selector("none") if spec.ratio == 1.0 else Selector("loss", spec.ratio)
    backward = backward_of(spec.method)  # one object for the run
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # completion, kept and context rows
    real, times, losses = 0, [], []
    for step in range(s.steps):
        b = rows.rows(step * s.batch_size, (step + 1) * s.batch_size)
        t0 = time.perf_counter()
        with autocast(s):
            # CPU position ids: the document layout is built on the host.
            out = model(b.input_ids.to(device), labels=b.labels.to(device), position_ids=b.position_ids,
                        backward=backward)  # fmt: skip
        count = selector.count(out.valid)
        keep = selector(out.token_loss, out.valid, count=count)
        # With the count known the plan takes the compact path even at ρ = 1 (on
        # the CPU; `auto` may pick the dense one on a GPU): the check exercises it.
        loss = out.plan.loss(out.token_loss, keep, count)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step: the time below is the step's
        times.append(time.perf_counter() - t0)
        real += int((b.example >= 0).sum())
        sums += torch.stack([out.valid.sum(), keep.sum(), out.plan.context.sum()]).to(sums)
    if not all(map(math.isfinite, losses)):
        raise FloatingPointError(f"{spec.name}: the training loss became {losses[-1]}")
    valid, kept, context = sums.tolist()
    exact = isinstance(backward, str)
    # The layers' backward runs on every token (exact), on the kept and context
    # rows (context=backward) or on the kept rows alone (context=constant).
    rows_in_backward = real if exact else kept + (context if backward.context == "backward" else 0)
    skip = max(1, len(times) // 10)  # the first steps include warm-up (allocation, compilation)
    info = dict(ms_per_step=1e3 * statistics.median(times[skip:]), train_s=sum(times),
                final_train_loss=statistics.fmean(losses[-10:]), tokens=real,
                completion_share=valid / real, kept_fraction=kept / valid,
                backward_rows=rows_in_backward / real,
                backward="exact" if exact else f"amplified ({out.plan.path} path)")  # fmt: skip
    return model, info


@torch.no_grad()
def evaluate_sft(model: LlamaForCausalLM, held: Rows, n_examples: int, s: Scale) -> dict:
    """Completion loss (mean over completion tokens), exact match (teacher
    forced: every completion token is the argmax, as in greedy decoding) and
    answer accuracy (the same on the answer and end tokens) on packed held-out
    examples."""
    device = torch.device(s.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    wrong = torch.zeros(n_examples, device=device)
    wrong_answer = torch.zeros(n_examples, device=device)
    for start in range(0, len(held), 2 * s.batch_size):
        b = held.rows(start, start + 2 * s.batch_size)
        ids = b.input_ids.to(device)
        with autocast(s):
            out = model(ids, labels=b.labels.to(device), position_ids=b.position_ids, backward="exact")
        valid = out.valid  # row t predicts token t + 1, of the same example
        h = out.hidden[valid]
        pred = (h @ model.lm_head.weight.to(h.dtype).t()).argmax(-1)
        miss = (pred != ids.roll(-1, dims=1)[valid]).float()
        ex = b.example.to(device)[valid]
        answer = b.answer.to(device).roll(-1, dims=1)[valid]
        wrong.index_add_(0, ex, miss)
        wrong_answer.index_add_(0, ex[answer], miss[answer])
        loss_sum += out.token_loss[valid].double().sum()
        n_tokens += int(valid.sum())
    return dict(loss=float(loss_sum) / n_tokens, exact_match=float((wrong == 0).float().mean()),
                answer_accuracy=float((wrong_answer == 0).float().mean()))  # fmt: skip


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def fingerprint(state: dict) -> float:
    """Names the base a run started from (a rebuilt base differs on a GPU,
    which is not bit-reproducible): the sum of its weights' squares."""
    return sum(float(v.double().pow(2).sum()) for v in state.values())


def relative_difference(a: dict, b: dict, base: dict) -> float:
    """||a - b|| / ||b - base|| over all weights: a's difference from b as a
    share of b's fine-tuning update."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float((b[k] - base[k]).double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def run_one(spec: RunSpec, s: Scale, base: tuple[Path, dict], rows: Rows, held: Rows, n_held: int,
            out: Path, work: Path) -> dict:  # fmt: skip
    """Train and evaluate one run from ``base`` (its checkpoint and weights); the
    result goes to ``out/runs/NAME``. Plain SFT's final weights go to ``work``
    for its seed's ρ = 1 check."""
    model, info = fine_tune(spec, s, base[0], rows)
    res = dict(asdict(spec), base_fingerprint=fingerprint(base[1]), **info,
               **{f"eval_{k}": v for k, v in evaluate_sft(model, held, n_held, s).items()})  # fmt: skip
    plain = work / "weights" / f"{PLAIN}-s{spec.seed}.pt"
    if spec.method == PLAIN:
        plain.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights(model), plain)
    elif spec.ratio == 1.0 and plain.is_file():
        res["weight_difference"] = relative_difference(weights(model), torch.load(plain), base[1])
    done = out / "runs" / spec.name / "result.json"
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(res, indent=1))
    return res


# --- report --------------------------------------------------------------------
def paired(results: list[dict], of: tuple[str, float], other: tuple[str, float], key: str) -> list[float]:
    """Per seed: ``key`` of the runs of ``of`` (method, ρ) minus those of ``other``."""
    by = {(r["method"], r["ratio"], r["seed"]): r[key] for r in results}
    return [v - by[(*other, sd)] for (m, rr, sd), v in sorted(by.items())
            if (m, rr) == of and (*other, sd) in by]  # fmt: skip


def delta(results: list[dict], of, other, key: str, digits: int = 4, scale: float = 1.0) -> str:
    """:func:`paired` as "mean ± sd" ("—": none, or ``of`` is ``other``)."""
    return "—" if of == other else ue.fmt(paired(results, of, other, key), digits, scale)


def method_keys(results: list[dict]) -> list[tuple[str, float]]:
    """Every (method, ρ) of ``results``: ρ = 1 first, then by ρ, methods in :data:`METHODS` order."""
    return sorted({(r["method"], r["ratio"]) for r in results},
                  key=lambda k: (k[1] != 1.0, k[1], list(METHODS).index(k[0])))  # fmt: skip


def to_markdown(results: list[dict], s: Scale, meta: dict) -> str:
    d = meta["data"]
    lines = [
        f"Model `{s.model}` from its pretrained base, {s.steps} steps × {s.batch_size} rows × "
        f"{s.seq_len} tokens per run ({d['examples_per_row']:.1f} examples a row, "
        f"{100 * d['prompt_share']:.0f}% of the examples' tokens are prompt), lr {s.lr:g}, {s.dtype}, "
        f"device {meta['device']}. {d['train']} training examples, {d['held_out']} held-out "
        f"(disjoint word problems). Mean ± std over seeds; each seed has its own data order, "
        f"the same for every method.",
        "",
        "| method | ρ | runs | completion loss | exact match (%) | answer accuracy (%) | ms / step "
        "| backward rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b = meta.get("base_sft_eval")
    if b:
        lines.append(f"| base (no SFT) | — | — | {b['loss']:.4f} | {100 * b['exact_match']:.1f} | "
                     f"{100 * b['answer_accuracy']:.1f} | — | — |")  # fmt: skip
    keys = method_keys(results)
    for method, ratio in keys:
        rs = [r for r in results if (r["method"], r["ratio"]) == (method, ratio)]
        lines.append(
            f"| {method} | {ratio:g} | {len(rs)} | {ue.fmt([r['eval_loss'] for r in rs])} | "
            f"{ue.fmt([r['eval_exact_match'] for r in rs], 1, 100)} | "
            f"{ue.fmt([r['eval_answer_accuracy'] for r in rs], 1, 100)} | "
            f"{ue.fmt([r['ms_per_step'] for r in rs], 1)} | {ue.fmt([r['backward_rows'] for r in rs], 2)} |"
        )
    paths = sorted({r["backward"] for r in results if r["backward"] != "exact"})
    lines += [
        "",
        "; ".join(f"{m}: {desc}" for m, (_, desc) in METHODS.items()) + ". ρ: share of the "
        "completion tokens kept. Centrifuge's backward: " + (", ".join(paths) or "—")
        + " (`auto` picks the path by the GEMM work per layer; the dense path computes the same "
        "gradients and costs what the exact backward costs). *backward rows*: share of the real "
        "tokens in the layers' backward set (1 for the exact backward). Paired by seed: Δ = "
        "method − masked-loss selection at the same ρ, and method − plain SFT (loss: negative = "
        "better; exact match in points: positive = better).",
        "",
        "| method | ρ | seeds | Δ loss vs masked | Δ exact match vs masked | Δ loss vs plain "
        "| Δ exact match vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = (PLAIN, 1.0)
    for key in keys:
        if key == plain:
            continue
        masked = (MASKED, key[1])
        lines.append(f"| {key[0]} | {key[1]:g} | {len(paired(results, key, plain, 'eval_loss'))} | "
                     f"{delta(results, key, masked, 'eval_loss')} | "
                     f"{delta(results, key, masked, 'eval_exact_match', 1, 100)} | "
                     f"{delta(results, key, plain, 'eval_loss')} | "
                     f"{delta(results, key, plain, 'eval_exact_match', 1, 100)} |")  # fmt: skip
    check = [r for r in results if r["method"] == CENTRIFUGE and r["ratio"] == 1.0]
    if check:
        dl = [abs(x) for x in paired(results, (CENTRIFUGE, 1.0), plain, "eval_loss")]
        dw = [r["weight_difference"] for r in check if "weight_difference" in r]
        lines += ["", f"Check, Centrifuge at ρ = 1 (context=backward) against plain SFT, same seed: "
                  f"|Δ completion loss| ≤ {max(dl, default=math.nan):.1e}"
                  + (f", final weights differ by ≤ {max(dw):.1e} of plain SFT's update" if dw else "")
                  + f" ({len(check)} seed{'s' if len(check) > 1 else ''}; it must be float noise)."]
    if meta.get("base"):
        base = meta["base"]
        lines += ["", f"Base model ({base['steps']} steps on {base['text']}): answer accuracy "
                  f"{100 * base['eval']['accuracy']:.1f}% on the corpus' held-out problems in "
                  "its own format."]  # fmt: skip
    if meta.get("failed"):
        lines += ["", "Failed runs: " + "; ".join(meta["failed"]) + "."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], s: Scale, path: Path) -> None:
    """Held-out completion loss, exact match and answer accuracy of every
    (method, ρ): the mean as a bar, every seed as a dot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = method_keys(results)
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:red")))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2))
    panels = ((axes[0], "eval_loss", "held-out completion loss", 1.0),
              (axes[1], "eval_exact_match", "held-out exact match (%)", 100.0),
              (axes[2], "eval_answer_accuracy", "held-out answer accuracy (%)", 100.0))  # fmt: skip
    for ax, key, label, scale in panels:
        for i, (method, ratio) in enumerate(keys):
            ys = [r[key] * scale for r in results if (r["method"], r["ratio"]) == (method, ratio)]
            ax.bar(i, statistics.fmean(ys), color=colors[method], alpha=0.6)
            ax.plot([i] * len(ys), ys, "k.", ms=4)
        ax.set_xticks(range(len(keys)), [f"{m}\nρ={r:g}" for m, r in keys], fontsize=7, rotation=30)
        ax.set_ylabel(label)
        if key == "eval_loss":
            ys = [r[key] for r in results]
            ax.set_ylim(0.9 * min(ys), max(ys) + 0.1 * (max(ys) - min(ys)) + 1e-9)
    fig.suptitle(f"SFT from a pretrained base: {s.model}, {s.steps} steps × {s.batch_size} × "
                 f"{s.seq_len} tokens per run")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, s: Scale, results: list[dict], meta: dict, figure: bool = True) -> None:
    (out / "results.json").write_text(json.dumps(dict(meta=meta, runs=results), indent=1))
    (out / "results.md").write_text(to_markdown(results, s, meta))
    if figure and results:
        plot(results, s, out / "sft.png")


def device_name(s: Scale) -> str:
    if s.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"


# --- main ----------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="results directory (default runs/sft-SCALE)")
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the base, the token cache and plain SFT's weights (default: --out)")
    p.add_argument("--device", default=None, help="override the scale's device")
    p.add_argument("--steps", type=int, default=None, help="override the scale's SFT steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the scale's seeds")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    s = SCALES[args.scale]
    s.device = args.device or s.device
    s.steps = args.steps or s.steps
    s.seeds = args.seeds or s.seeds
    out = args.out or Path("runs") / f"sft-{args.scale}"
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        s = Scale(**saved["meta"]["config"])
        write_report(out, s, saved["runs"], saved["meta"])
        print((out / "results.md").read_text())
        return 0
    ue.start(s, args, out)
    work = args.work or out
    work.mkdir(parents=True, exist_ok=True)

    def say(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    # 1. The base: utility_experiment's, at this scale's model, shape and length.
    tok = load_tokenizer("byte")
    bs = ue.Scale(model=s.model, device=s.device, dtype=s.dtype, seq_len=s.seq_len, batch_size=s.batch_size,
                  steps=s.base_steps, lr=s.base_lr, warmup=s.warmup, ref_steps=0, train_docs=0, clean_docs=0,
                  evals=1, eval_rows=32, eval_problems=300, inits=["base"], base_steps=s.base_steps,
                  base_lr=s.base_lr, base_corpus_docs=s.base_corpus_docs)  # fmt: skip
    eval_ds = load_dataset(None, tok, s.seq_len, split="eval", cache_dir=work / "cache", seed=0)
    base, base_info = ue.pretrain_base(bs, work, work / "cache", eval_ds, say)

    # 2. The instruction sets.
    train_ex, held_ex = instruction_sets(s, tok)
    held = pack(held_ex, s.seq_len, tok.pad_id)
    prompt = sum(len(e.prompt) for e in train_ex)
    data = dict(train=len(train_ex), held_out=len(held_ex),
                prompt_share=prompt / sum(len(e.prompt) + len(e.completion) for e in train_ex),
                examples_per_row=len(train_ex) / len(pack(train_ex, s.seq_len, tok.pad_id)))  # fmt: skip
    base_model = LlamaForCausalLM.from_pretrained(base).to(s.device)
    base_weights = weights(base_model)
    base_sft = evaluate_sft(base_model, held, len(held_ex), s)
    del base_model
    say(f"instruction set: {data['train']} training, {data['held_out']} held-out examples, "
        f"{100 * data['prompt_share']:.0f}% prompt tokens; base on it: completion loss "
        f"{base_sft['loss']:.4f}, exact match {100 * base_sft['exact_match']:.1f}%")
    meta = dict(scale=args.scale, device=device_name(s), torch=torch.__version__, config=asdict(s),
                data=data, base=base_info, base_sft_eval=base_sft, failed=[])  # fmt: skip

    # 3. The runs; earlier calls' results with the same settings, from this
    # base, count as done.
    earlier = {k: r for k, r in ue.earlier_results(out, ue.earlier_saved(out, s)).items()
               if r.get("base_fingerprint") == fingerprint(base_weights)}  # fmt: skip
    results, rows = [], {}
    runs = plan_runs(s)
    for i, spec in enumerate(runs):
        if spec.name in earlier:
            results.append(earlier[spec.name])
            continue
        if spec.seed not in rows:
            rows = {spec.seed: training_rows(train_ex, s, spec.seed, tok.pad_id)}
        try:
            r = run_one(spec, s, (base, base_weights), rows[spec.seed], held, len(held_ex), out, work)
        except Exception as e:  # keep the other runs' results; report this one as failed
            meta["failed"].append(f"{spec.name} ({type(e).__name__}: {e})")
            say(f"run {i + 1}/{len(runs)} {spec.name} FAILED: {type(e).__name__}: {e}")
            continue
        results.append(r)
        say(f"run {i + 1}/{len(runs)} {spec.name}: completion loss {r['eval_loss']:.4f}, exact match "
            f"{100 * r['eval_exact_match']:.1f}%, answer {100 * r['eval_answer_accuracy']:.1f}%, "
            f"{r['ms_per_step']:.1f} ms/step")  # fmt: skip
        write_report(out, s, results, meta, figure=False)  # after every run: a cut-off call keeps it
    write_report(out, s, results, meta)
    print((out / "results.md").read_text())
    say(f"done: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
