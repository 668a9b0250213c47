"""Utility experiment: does Centrifuge's amplified backward keep Rho-1's gains?

    python scripts/utility_experiment.py --scale smoke             # CPU, a few minutes
    python scripts/utility_experiment.py --scale full              # one GPU, a few minutes
    python scripts/utility_experiment.py --scale continued-smoke   # CPU: the continued-training mode
    python scripts/utility_experiment.py --scale continued-full    # one GPU: byte-110m, the paper's setting
    python scripts/utility_experiment.py --scale continued-full --shard 0/2 --out D/shard0  # and 1/2
    python scripts/utility_experiment.py --report-only --merge D/shard0 D/shard1 --out D      # one report

On the built-in corpus (math word problems with noise spans) it

1. trains a reference model on clean problems (the corpus' ``clean`` documents),
2. scores the noisy training corpus with it (``centrifuge score``: every token's
   reference loss stored beside the data),
3. trains, at the same token budget and seeds, standard training (all tokens),
   Rho-1 with the exact masked backward and Rho-1 with Centrifuge's amplified
   backward at ρ ∈ {0.3, 0.5, 0.7},
4. evaluates every saved checkpoint on clean held-out problems (loss,
   perplexity, answer accuracy), and writes results.json, results.md and
   curves.png to the output directory.

Quality knobs (``--knobs``: ``BackwardOptions.parse`` specs, as ``centrifuge
bench --knob`` takes them: ``extra=0.5,extra_weight=1.5``, ``exact_layers=2``
(bottom layers exact), ``exact_top=2`` (top layers exact), ``kv_projections=1``
(filtered rows' K/V gradient reaches the K/V projections), ``backward_ratio=0.75``
(the rows ranked next join the backward without a loss)) add Rho-1 Centrifuge
runs with that knob at the headline ρ and seeds; so do the exact-backward
schedules of ``centrifuge train`` (``exact_every=4``: every 4th step exact;
``exact_final=0.2``: the last 20% of the steps), alone or with a knob in one
spec. The report gives every Centrifuge variant's share of Rho-1 exact's gain
over standard training (mean ± std over seeds and the 95% interval of the mean)
and its step time over Rho-1 exact's.

    python scripts/utility_experiment.py --scale continued-full --inits base --seeds 0 1 2 3 4 \\
        --side-seeds --knobs extra=0.5,extra_weight=1.5 backward_ratio=0.75 exact_top=2 \\
        kv_projections=1 --prune --out runs/knobs    # ≥ 5 seeds from the base, one GPU

Gradient diagnosis on the trained base (``scripts/gradient_diagnosis.py``): a
run-list glob that matches nothing (``--runs none``) builds only the base, the
reference and the scores, then the diagnosis reads them from ``--work``:

    python scripts/utility_experiment.py --scale continued-full --inits base --runs none --work W
    python scripts/gradient_diagnosis.py --model W/base/checkpoint-750 \\
        --reference W/reference/checkpoint-150 --data W/train.jsonl --select rho1 --ratio 0.5 \\
        --seq-len 2048 --batch-size 4 --batches 4 --setting amplified= --setting top2=exact_top=2 \\
        --setting kvproj=kv_projections=1 --setting next0.75=backward_ratio=0.75 --out diag.json

Continued training (scales whose ``inits`` hold ``base``, the setting of Rho-1
and of the Centrifuge paper): first a *base* model is pretrained on general
text (the docstrings and reference topics of Python's standard library,
``centrifuge.data.prose``, mixed with built-in corpus documents that no run
trains on), then the reference model is trained from the base on clean
problems, and the ``cont-`` runs start from the base; runs of ``scratch``
init start from random weights with the same reference scores.

All runs train on the same token stream (the corpus' noisy ``train`` documents
of corpus seed 0, written to a JSONL file): a run's seed sets its model
initialisation and data order, not the corpus, so seeds are paired across
methods. Finished runs are reused when the script is run again (``--fresh``
starts over); with ``--time-budget`` the runs that do not fit are skipped
and listed as such.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import random
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

# Runs as a file: make the checkout importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from centrifuge.cli import main as centrifuge_cli  # noqa: E402
from centrifuge.data import corpus, load_dataset, load_tokenizer  # noqa: E402
from centrifuge.evaluation import evaluate, loss_by_token_type  # noqa: E402
from centrifuge.data import prose  # noqa: E402
from centrifuge.models import LlamaForCausalLM  # noqa: E402
from centrifuge.plan import BackwardOptions  # noqa: E402
from centrifuge.training import TrainConfig, train  # noqa: E402


@dataclass
class Scale:
    model: str  # preset
    device: str
    dtype: str
    seq_len: int
    batch_size: int
    steps: int  # every run: steps * batch_size * seq_len tokens
    lr: float
    warmup: int
    ref_steps: int
    train_docs: int  # noisy training documents (corpus seed 0)
    clean_docs: int  # clean documents for the reference model
    evals: int  # checkpoints evaluated per run (evenly spaced, the last included)
    eval_rows: int  # clean held-out rows per evaluation
    eval_problems: int  # held-out problems for answer accuracy
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # headline (ρ = 0.5)
    side_seeds: list[int] = field(default_factory=lambda: [0])  # ρ = 0.3, 0.7
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    headline_ratio: float = 0.5
    threads: int | None = None  # CPU intra-op threads
    knobs: list[str] = field(default_factory=list)  # quality knobs at the headline ρ and seeds
    inits: list[str] = field(default_factory=lambda: ["scratch"])  # and/or "base": continued training
    base_steps: int = 0  # pretraining steps of the base model (inits holding "base")
    base_lr: float = 3e-3
    base_corpus_docs: int = 0  # built-in corpus documents mixed into the base's general text
    scratch_lr: float | None = None  # lr of the scratch runs when the continued ones use a lower one
    # Also Rho-1 Centrifuge at equal training time: steps x (Rho-1 exact's step
    # time / Centrifuge's), measured on the same seed's two equal-token runs.
    equal_time: bool = False
    # The compared runs replay their steps from CUDA graphs (centrifuge train
    # --cuda-graphs; standard, Rho-1 exact and Centrifuge alike). The base and
    # the reference train eagerly, so they are the same with or without.
    cuda_graphs: bool = False


SCALES = {
    # Tiny model, short runs: a CPU check that the pipeline works and moves
    # in the expected direction. Not evidence by itself.
    "smoke": Scale(model="tiny", device="cpu", dtype="fp32", seq_len=128, batch_size=8, steps=240,
                   lr=3e-3, warmup=20, ref_steps=240, train_docs=1500, clean_docs=1500, evals=3,
                   eval_rows=48, eval_problems=100, threads=1),
    # The real run, for one GPU.
    "full": Scale(model="small", device="cuda", dtype="bf16", seq_len=512, batch_size=16, steps=400,
                  lr=3e-3, warmup=40, ref_steps=400, train_docs=6000, clean_docs=6000, evals=5,
                  eval_rows=256, eval_problems=300, side_seeds=[0, 1, 2], equal_time=True),
    # Continued training from a pretrained base, tiny model on the CPU: checks the mode.
    "continued-smoke": Scale(model="tiny", device="cpu", dtype="fp32", seq_len=128, batch_size=8,
                             steps=240, lr=2e-3, warmup=20, ref_steps=120, train_docs=1500,
                             clean_docs=1500, evals=3, eval_rows=48, eval_problems=100,
                             inits=["base", "scratch"], base_steps=600, base_corpus_docs=500,
                             knobs=["extra=0.5,extra_weight=1.5", "exact_layers=1"], threads=1),
    # The paper's setting at a size that means something: a 12-layer, 114M-parameter
    # base (GPT-2-small class, byte vocabulary), one GPU. The base sees few task
    # documents (with 2000, seven passes, it already solved 97% of the held-out
    # problems and left Rho-1 nothing to gain), and 16 x 2048 tokens per step
    # make the step FLOP-bound (at 16 x 1024 it is host-bound on an H200 and
    # no backward is faster than another).
    "continued-full": Scale(model="byte-110m", device="cuda", dtype="bf16", seq_len=2048,
                            batch_size=16, steps=150, lr=3e-4, warmup=15, ref_steps=150,
                            train_docs=6000, clean_docs=6000, evals=3, eval_rows=256,
                            eval_problems=300, inits=["base", "scratch"], base_steps=750,
                            base_lr=6e-4, scratch_lr=6e-4, base_corpus_docs=200,
                            knobs=["exact_layers=2", "extra=0.5,extra_weight=1.5"],
                            equal_time=True),
}  # fmt: skip
INITS = {"base": "continued training from the pretrained base", "scratch": "from scratch"}


@dataclass
class RunSpec:
    name: str
    method: str  # standard | rho1-exact | rho1-centrifuge | rho1-centrifuge+<knob>
    select: str
    backward: str
    ratio: float
    seed: int
    knob: str = ""  # BackwardOptions.parse spec of a quality knob ("": none)
    init: str = "scratch"  # scratch | base (continued training from the pretrained base)
    steps: int | None = None  # the scale's steps unless set (equal-time runs)


EQUAL_TIME = "rho1-centrifuge-eqtime"


# Schedule keys of a knob spec: centrifuge train options (the exact backward on
# some steps), not BackwardOptions; their suffix in a run's name.
SCHEDULES = {"exact_every": (int, "+every{}"), "exact_final": (float, "+final{:g}")}


def split_knob(knob: str) -> tuple[str, dict]:
    """(BackwardOptions spec, schedule options) of a knob spec:
    ``exact_every=4,kv_projections=1`` -> ``("kv_projections=1", {"exact_every": 4})``."""
    items = [i.strip() for i in knob.split(",") if i.strip()]
    schedule = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in SCHEDULES:
            try:
                schedule[key] = v = SCHEDULES[key][0](value)
            except ValueError:
                v = None
            if v is None or not (v >= 1 if key == "exact_every" else 0 < v <= 1):
                raise ValueError(f"bad schedule option {item!r} in {knob!r}: exact_every=K takes "
                                 "K >= 1, exact_final=F takes F in (0, 1]")  # fmt: skip
    return ",".join(i for i in items if i.partition("=")[0] not in SCHEDULES), schedule


def knob_method(knob: str) -> str:
    """``extra=0.5,extra_weight=1.5`` -> ``rho1-centrifuge+extra0.5w1.5``;
    ``exact_every=4`` -> ``rho1-centrifuge+every4``."""
    spec, schedule = split_knob(knob)
    desc = BackwardOptions.parse(spec).describe().removeprefix("amplified")
    desc += "".join(SCHEDULES[k][1].format(v) for k, v in schedule.items())
    return "rho1-centrifuge" + desc.replace("(", "").replace(")", "")


def plan_runs(s: Scale) -> list[RunSpec]:
    """Headline comparison first, then the knobs, then the side ratios (so a
    time budget cuts the side ratios first)."""
    runs = []

    def add(init, seed, ratio, methods=(("rho1-exact", "exact", ""), ("rho1-centrifuge", "amplified", ""))):
        pre = "" if init == "scratch" else "cont-"
        for method, backward, knob in methods:
            runs.append(RunSpec(f"{pre}{method}-r{ratio:g}-s{seed}", method, "rho1", backward, ratio,
                                seed, knob, init))  # fmt: skip

    for init in s.inits:
        pre = "" if init == "scratch" else "cont-"
        for seed in s.seeds:
            runs.append(RunSpec(f"{pre}standard-s{seed}", "standard", "none", "exact", 1.0, seed,
                                init=init))  # fmt: skip
            add(init, seed, s.headline_ratio)
            if s.equal_time:  # its steps are set once the two runs above have run
                add(init, seed, s.headline_ratio, [(EQUAL_TIME, "amplified", "")])
    for init in s.inits:
        for seed in s.seeds:
            add(init, seed, s.headline_ratio, [(knob_method(k), "amplified", k) for k in s.knobs])
    for init in s.inits:
        for seed in s.side_seeds:
            for r in s.ratios:
                if r != s.headline_ratio:
                    add(init, seed, r)
    return runs


def shard_runs(runs: list[RunSpec], shard: int, shards: int) -> list[RunSpec]:
    """The runs of process ``shard`` of ``shards`` (one per GPU).

    A shard takes whole seeds of an init: every run of a seed (its headline, its
    equal-time run, which needs the headline's step times, its knobs and side
    ratios) is compared with that seed's standard and Rho-1 exact runs, and only
    runs from the same rebuilt base and reference pair (:func:`pair_key`). So
    a shard runs seed by seed, in plan order within a seed: a call that runs out
    of time leaves one seed unfinished, not the knobs of every seed. Seeds go to
    the shard with the fewest runs. Deterministic: every call gives a shard the
    same runs."""
    groups: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        groups.setdefault((r.init, r.seed), []).append(r)
    load, mine = [0] * shards, []
    for g in groups.values():
        k = load.index(min(load))
        load[k] += len(g)
        if k == shard:
            mine += g
    return mine


def write_jsonl(path: Path, texts: list[str]) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        os.replace(tmp, path)
    return path


def base_config(s: Scale, data: Path, out_dir: Path, cache: Path, **kw) -> TrainConfig:
    steps = kw.pop("steps", s.steps)
    save = max(1, steps // s.evals)
    return TrainConfig(
        model=kw.pop("model", s.model), data=[str(data)], tokenizer="byte", seq_len=s.seq_len,
        batch_size=s.batch_size, lr=kw.pop("lr", s.lr), warmup_steps=s.warmup, steps=steps, dtype=s.dtype,
        device=s.device, eval_interval=0, save_interval=save, eval_rows=8, out_dir=str(out_dir),
        cache_dir=str(cache), **kw,
    )  # fmt: skip


def step_times(metrics: Path) -> list[float]:
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [r["step_s"] for r in recs if r.get("kind") == "train"]


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for d in run_dir.glob("checkpoint-*"):
        if d.is_dir() and (d / "config.json").is_file():
            out.append((int(d.name.split("-")[1]), d))
    return sorted(out)


def evaluate_checkpoint(path: Path, eval_ds, s: Scale, reference=None) -> dict:
    """Clean held-out loss, perplexity and answer accuracy; with the
    ``reference`` model also the loss by kind of token and the share of each
    kind that Rho-1 at the headline ρ keeps (``by_type``)."""
    model = LlamaForCausalLM.from_pretrained(path).to(s.device)
    problems = eval_ds.problems[: s.eval_problems]
    r = evaluate(model, eval_ds, 2 * s.batch_size, s.device, max_rows=s.eval_rows, problems=problems)
    out = dict(loss=r["loss"], perplexity=r["perplexity"], accuracy=r["accuracy"])
    if reference is not None:
        out["by_type"] = loss_by_token_type(model, eval_ds.tokenizer, problems, s.device, reference,
                                            s.headline_ratio, batch_size=2 * s.batch_size)  # fmt: skip
    return out


def knob_options(knob: str) -> dict:
    """TrainConfig fields of a knob spec (its schedule options included)."""
    spec, schedule = split_knob(knob)
    o = BackwardOptions.parse(spec)
    weight = None if o.extra == 0 or math.isclose(o.weight, 1 / o.extra) else o.weight
    return dict(backward_extra=o.extra, backward_extra_weight=weight, exact_layers=o.exact_layers,
                exact_top=o.exact_top, kv_projections=o.kv_projections,
                backward_ratio=o.backward_ratio, **schedule)


def run_one(spec: RunSpec, s: Scale, data: Path, scores: Path, out: Path, cache: Path, eval_ds,
            base: Path | None = None, work: Path | None = None, prune: bool = False,
            reference: tuple[float, torch.nn.Module] | None = None) -> dict:  # fmt: skip
    """Train and evaluate one run; its result (and metrics) go to ``out/runs/NAME``,
    its checkpoints to ``work`` (default ``out``; deleted after evaluation with
    ``prune``). A run whose result exists is not trained again."""
    done = out / "runs" / spec.name / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir = (work or out) / "runs" / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: start it again
    extra = dict(select=spec.select, ratio=spec.ratio, backward=spec.backward, seed=spec.seed)
    if spec.select == "rho1":
        extra["reference_scores"] = str(scores)
    if spec.knob:
        extra.update(knob_options(spec.knob))
    if spec.steps is not None:
        extra["steps"] = spec.steps
    if spec.init == "base":
        extra["model"] = str(base)
    elif s.scratch_lr is not None:
        extra["lr"] = s.scratch_lr
    cfg = base_config(s, data, run_dir, cache, cuda_graphs=s.cuda_graphs, **extra)
    summary = train(cfg, progress=False)
    times = step_times(Path(summary["metrics"]))
    skip = max(1, len(times) // 10)  # the first steps include warm-up (allocation, compilation)
    curve, saved = [], checkpoints(run_dir)
    ref_loss, ref_model = reference or (None, None)
    for step, ck in saved:
        last = ref_model if step == saved[-1][0] else None  # the breakdown of the final model
        curve.append(dict(step=step, tokens=step * cfg.tokens_per_step(), train_s=sum(times[:step]),
                          **evaluate_checkpoint(ck, eval_ds, s, last)))  # fmt: skip
        if prune:
            shutil.rmtree(ck)
    by_type = curve[-1].pop("by_type", None)
    res = dict(asdict(spec), reference_loss=ref_loss, steps=summary["steps"],
               tokens_seen=summary["tokens_seen"], tokens_kept=summary["tokens_kept"],
               kept_fraction=summary["kept_fraction"], ms_per_step=1e3 * statistics.median(times[skip:]),
               train_s=sum(times), wall_s=summary["wall_s"],
               final_train_loss=summary["final_train_loss"], curve=curve,
               eval_loss=curve[-1]["loss"], eval_accuracy=curve[-1]["accuracy"], by_type=by_type)  # fmt: skip
    done.parent.mkdir(parents=True, exist_ok=True)
    if done.parent != run_dir:
        shutil.copy(summary["metrics"], done.parent / "metrics.jsonl")
    done.write_text(json.dumps(res, indent=1))
    return res


def bench_prices(path: Path, ratio: float) -> dict:
    """Step and backward time over dense of every Centrifuge variant in a
    ``centrifuge bench`` JSON (its ``--knob`` variants at ``ratio``), keyed by the
    methods here: the speed axis of the Pareto table."""
    d = json.loads(Path(path).read_text())
    entry = next((e for e in d["ratios"] if e["ratio"] == ratio and "c/a" in e), None)
    if entry is None:
        raise SystemExit(f"{path}: no Centrifuge timing at ρ = {ratio:g} (bench --ratios {ratio:g})")
    plain = {k: entry["c/a"][k] for k in ("step", "backward")}
    prices = {"rho1-centrifuge": plain, EQUAL_TIME: plain}
    for name, v in entry.get("knobs", {}).items():  # centrifuge+extra0.5(w1.5) -> rho1-centrifuge+extra0.5w1.5
        prices["rho1-" + name.replace("(", "").replace(")", "")] = v
    m = d["model"]
    return dict(source=Path(path).name, device=d["environment"]["device"],
                setting=f"{m['preset']}, {m['tokens_per_step']} tokens per step", prices=prices)  # fmt: skip


def equal_time_steps(spec: RunSpec, s: Scale, results: list[dict]) -> int | None:
    """Steps of an equal-time run: the scale's steps times Rho-1 exact's step time
    over Centrifuge's, both from this seed's equal-token runs (None if missing)."""
    def find(method):
        return next((r for r in results if r["method"] == method and r["seed"] == spec.seed
                     and r["ratio"] == spec.ratio and init_of(r) == spec.init), None)  # fmt: skip

    exact, amplified = find("rho1-exact"), find("rho1-centrifuge")
    if exact is None or amplified is None:
        return None
    return max(1, round(s.steps * exact["ms_per_step"] / amplified["ms_per_step"]))


def base_documents(s: Scale) -> list[str]:
    """General text (the standard library's documentation) mixed with built-in
    corpus training documents that no run trains on (those after the first
    ``train_docs``), in a fixed shuffled order."""
    math_docs = corpus.documents("train", seed=0, n=s.train_docs + s.base_corpus_docs)[s.train_docs :]
    docs = [*prose.stdlib_documents(), *math_docs]
    random.Random(0).shuffle(docs)
    return docs


def pretrain_base(s: Scale, work: Path, cache: Path, eval_ds, say) -> tuple[Path, dict]:
    """Train (or reuse) the base model; returns its checkpoint and a description.
    A later call rebuilds it from the same data and seed: the same base on the
    CPU, a slightly different one on a GPU (not bit-reproducible), which is why
    every run records its reference (:func:`pair_key`)."""
    base_dir = work / "base"
    docs = base_documents(s)
    data = write_jsonl(work / "base.jsonl", docs)
    if not (base_dir / "latest").is_file():
        say(f"pretraining the base model on {len(docs)} documents ({s.base_steps} steps)")
        cfg = base_config(s, data, base_dir, cache, select="none", steps=s.base_steps,
                          lr=s.base_lr, seed=2000)  # fmt: skip
        train(cfg, progress=False)
    ckpt = checkpoints(base_dir)[-1][1]
    r = evaluate_checkpoint(ckpt, eval_ds, s)
    say(f"base: clean eval loss {r['loss']:.4f}, accuracy {r['accuracy']:.3f}")
    info = dict(steps=s.base_steps, tokens=s.base_steps * s.batch_size * s.seq_len,
                text=f"{prose.fingerprint()} + {s.base_corpus_docs} built-in corpus documents",
                documents=len(docs), eval=r)  # fmt: skip
    return ckpt, info


def gradient_check(s: Scale, train_data: Path, scores: Path, cache: Path) -> dict:
    """Before timing anything on this device: one Rho-1 step of the experiment's
    model, both backward modes and every knob, against the reference semantics
    in plain autograd (float32). Returns the relative gradient errors."""
    from centrifuge import Selector, build_model, get_preset
    from centrifuge.models.reference import reference_filtered_loss
    from centrifuge.scoring import load_reference_scores

    ds = load_dataset([str(train_data)], load_tokenizer("byte"), s.seq_len, cache_dir=cache)
    # Two rows: the float32 reference keeps an [L, L] attention matrix per head and layer.
    rows = list(range(min(len(ds), 2)))
    b = {k: v.to(s.device) for k, v in ds.batch(rows).items()}
    ref = torch.from_numpy(load_reference_scores(scores, ds)[rows]).to(s.device)
    config = get_preset(s.model)
    model = build_model(config, device=s.device, seed=0)

    def as_runs(opts: BackwardOptions) -> BackwardOptions:
        # The backward path the runs take (their batch decides it), not this check's.
        opts.path = opts.choose_path(s.batch_size * s.seq_len, config.layer_parameters(),
                                     torch.device(s.device).type)  # fmt: skip
        return opts

    out = {}
    modes = {"amplified": as_runs(BackwardOptions()), "exact": "exact",
             **{k: as_runs(BackwardOptions.parse(k)) for k in s.knobs}}  # fmt: skip
    for name, mode in modes.items():
        model.zero_grad(set_to_none=True)
        o = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], backward=mode)
        rb = None if mode == "exact" else mode.backward_ratio
        keep, ranked = Selector("rho1", s.headline_ratio).select(o.token_loss, o.valid, ref, backward_ratio=rb)
        if ranked is not None:  # the rows ranked next join the backward (kv_weight holds them)
            o.plan.set_ranked(ranked)
        o.plan.loss(o.token_loss, keep).backward()
        got = [p.grad.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        # exact = ordinary autograd of the masked loss; amplified = K/V of filtered rows
        # detached; a knob: its reference semantics (Plan.reference_knobs: the K/V
        # weights of the sampled and ranked rows, exact layers, kv_projections)
        if mode != "exact":
            loss = reference_filtered_loss(model, b["input_ids"], b["labels"], keep,
                                           position_ids=b["position_ids"],
                                           **o.plan.reference_knobs(keep))  # fmt: skip
        else:
            from centrifuge.models.reference import reference_token_loss

            tl, _ = reference_token_loss(model, b["input_ids"], b["labels"], None,
                                         position_ids=b["position_ids"])  # fmt: skip
            loss = (tl * keep).sum() / keep.sum()
        loss.backward()
        want = [p.grad.detach() for p in model.parameters()]
        num = sum(float((g - w).double().pow(2).sum()) for g, w in zip(got, want))
        den = sum(float(w.double().pow(2).sum()) for w in want)
        out[name] = math.sqrt(num / den)
    model.zero_grad(set_to_none=True)
    return out


# --- report -------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def fmt(xs: list[float], digits: int = 4, scale: float = 1.0) -> str:
    m, sd = mean_std([x * scale for x in xs])
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" if math.isnan(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def percent(shares: list[float]) -> str:
    """Shares of a gain as "m ± s%" ("—": no seed had a gain to share)."""
    return fmt(shares, 0, 100) + "%" if shares else "—"


# Student's t 97.5% quantiles for 1..30 degrees of freedom (beyond: the normal's).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)  # fmt: skip


def interval95(shares: list[float]) -> str:
    """95% confidence interval of the mean of ``shares`` (the seeds' shares of a
    gain, paired runs) as "[lo, hi]%", Student's t over the seeds ("—": fewer
    than two)."""
    if len(shares) < 2:
        return "—"
    m, sd = mean_std(shares)
    n = len(shares)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.960) * sd / math.sqrt(n)
    return f"[{100 * (m - half):.0f}, {100 * (m + half):.0f}]%"


def groups(results: list[dict]) -> dict[tuple[str, float], list[dict]]:
    g: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        g.setdefault((r["method"], r["ratio"]), []).append(r)
    return g


def pair_key(r: dict) -> tuple[int, float]:
    """Runs compare with the runs of the same key: their seed, and the reference
    model (named by its clean eval loss) that scored their data and, from the
    base, was trained from the same base as them."""
    return r["seed"], r.get("reference_loss", 0.0)


def steady_s(r: dict, steps: int) -> float:
    """Seconds of ``steps`` of a run at its median step time: its training time
    without the first steps' one-time kernel compilation, which weighs on a
    150-step run and not on a real one."""
    return steps * r["ms_per_step"] / 1e3


def init_of(r: dict) -> str:
    return r.get("init", "scratch")


def inits_in(results: list[dict]) -> list[str]:
    return [i for i in INITS if any(init_of(r) == i for r in results)]


def to_markdown(results: list[dict], s: Scale, meta: dict) -> str:
    lines = [
        f"Model `{s.model}`, {s.steps} steps × {s.batch_size} rows × {s.seq_len} tokens "
        f"= {s.steps * s.batch_size * s.seq_len:,} training tokens per run, {s.dtype}, "
        f"device {meta['device']}. Clean held-out eval: {s.eval_rows} rows, "
        f"{s.eval_problems} problems. Mean ± std over seeds.",
    ]
    inits = inits_in(results)
    for init in inits:
        if len(inits) > 1:
            lines += ["", f"**{INITS[init].capitalize()}**"]
        mine = [r for r in results if init_of(r) == init]
        lines += init_tables(mine, meta.get("prices")) + type_table(mine, s.headline_ratio)
    if meta.get("skipped"):
        lines += ["", f"Not run (time budget or --runs): {', '.join(meta['skipped'])}."]
    return "\n".join(lines) + "\n"


def init_tables(results: list[dict], prices: dict | None = None) -> list[str]:
    """The tables of one init: every (method, ρ), the paired comparison of
    Rho-1 exact and Centrifuge, and every Centrifuge variant's share of the gain
    (with ``prices`` from :func:`bench_prices`: also its time over dense, which
    makes it the Pareto table)."""
    g = groups(results)
    order = sorted(g, key=lambda k: (k[1] != 1.0, k[1], k[0]))
    lines = [
        "",
        "| method | ρ | runs | clean eval loss | perplexity | answer accuracy (%) | ms / step | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        rs = g[key]
        method, ratio = key
        lines.append(
            f"| {method} | {ratio:g} | {len(rs)} | {fmt([r['eval_loss'] for r in rs])} | "
            f"{fmt([math.exp(r['eval_loss']) for r in rs], 3)} | "
            f"{fmt([r['eval_accuracy'] for r in rs], 1, 100)} | "
            f"{fmt([r['ms_per_step'] for r in rs], 1)} | {fmt([r['kept_fraction'] for r in rs], 2)} |"
        )
    # Paired differences: same seed (initialisation and data order) and same
    # base and reference (rebuilt ones differ: GPU training is not bit-reproducible).
    by = {(r["method"], r["ratio"], pair_key(r)): r for r in results}
    rows = []
    for ratio in sorted({r["ratio"] for r in results if r["method"] != "standard"}):
        seeds = sorted(sd for (m, rr, sd) in by if m == "rho1-exact" and rr == ratio
                       and ("rho1-centrifuge", ratio, sd) in by)  # fmt: skip
        if not seeds:
            continue
        d_amp = [by["rho1-centrifuge", ratio, sd]["eval_loss"] - by["rho1-exact", ratio, sd]["eval_loss"]
                 for sd in seeds]  # fmt: skip
        d_std = [by["rho1-exact", ratio, sd]["eval_loss"] - by["standard", 1.0, sd]["eval_loss"]
                 for sd in seeds if ("standard", 1.0, sd) in by]  # fmt: skip
        speed = [by["rho1-exact", ratio, sd]["ms_per_step"] / by["rho1-centrifuge", ratio, sd]["ms_per_step"]
                 for sd in seeds]  # fmt: skip
        rows.append(f"| {ratio:g} | {len(seeds)} | {fmt(d_std)} | {fmt(d_amp)} | {fmt(speed, 2)}× |")
    if rows:
        lines += [
            "",
            "Paired by seed: Δ loss (Rho-1 exact − standard; negative = Rho-1 better), "
            "Δ loss (Centrifuge − Rho-1 exact; ≈ 0 = gains kept), step-time speed-up of "
            "Centrifuge over Rho-1 exact.",
            "",
            "| ρ | seeds | Δ exact − standard | Δ Centrifuge − exact | speed-up |",
            "|---|---|---|---|---|",
            *rows,
        ]
    rows = []
    for method, ratio in sorted(k for k in g if k[0].startswith("rho1-centrifuge")):
        seeds = sorted(sd for (m, rr, sd) in by if m == method and rr == ratio
                       and ("rho1-exact", ratio, sd) in by and ("standard", 1.0, sd) in by)  # fmt: skip
        if not seeds:
            continue
        mine = [by[method, ratio, sd] for sd in seeds]
        exact = [by["rho1-exact", ratio, sd] for sd in seeds]
        shares = gain_shares(by, method, ratio)
        share = list(shares.values())
        amplified = gain_shares(by, "rho1-centrifuge", ratio)
        # Paired by seed: the variant's share minus the plain amplified backward's.
        gained = [shares[sd] - amplified[sd] for sd in shares if sd in amplified]
        vs_amplified = ("—" if method == "rho1-centrifuge" or not gained else
                        f"{fmt(gained, 0, 100)} {interval95(gained)}")  # fmt: skip
        delta = [m["eval_loss"] - e["eval_loss"] for m, e in zip(mine, exact)]
        time_ratio = [m["ms_per_step"] / e["ms_per_step"] for m, e in zip(mine, exact)]
        train_ratio = [steady_s(m, m["steps"]) / steady_s(e, e["steps"]) for m, e in zip(mine, exact)]
        row = (f"| {method} | {ratio:g} | {len(seeds)} | {fmt(delta)} | {percent(share)} | "
               f"{interval95(share)} | {vs_amplified} | "
               f"{fmt(time_ratio, 2)} | {fmt(train_ratio, 2)} |")  # fmt: skip
        if prices:
            price = prices["prices"].get(method)
            row += (" — | — |" if price is None else f" {price['backward']:.3f} | {price['step']:.3f} |")
        rows.append(row)
    if rows:
        lines += [
            "",
            "Every Centrifuge variant, paired by seed: Δ loss against Rho-1 exact, its share of "
            "Rho-1 exact's gain over standard training ((standard − variant) / (standard − exact), "
            "over the seeds where Rho-1 exact beat standard, with the 95% interval of its mean: "
            "Student's t over those seeds), the share minus the amplified backward's (paired by "
            "seed: mean ± std in points, and its 95% interval), "
            "its step time and its training time (steps × median step time) over Rho-1 exact's "
            "on this device "
            f"({EQUAL_TIME}: Centrifuge given Rho-1 exact's training time, so more steps).",
            "",
            "| variant | ρ | seeds | Δ − exact | share of the gain | 95% interval | share − amplified's | "
            "step time / exact | training time / exact |"
            + (" backward / dense ¹ | step / dense ¹ |" if prices else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if prices else ""),
            *rows,
        ]
        if prices:
            lines += ["", f"¹ `centrifuge bench` ({prices['setting']}, {prices['device']}, ρ = {ratio:g}; "
                      f"{prices['source']}): the variant's time over dense training's."]
    return lines


def gain_shares(by: dict, method: str, ratio: float) -> dict:
    """{pair key: share of Rho-1 exact's gain over standard training} of
    ``method`` at ``ratio``, ``by`` keyed (method, ratio, pair key): (standard −
    method) / (standard − exact), for the keys with all three runs where Rho-1
    exact beat standard (elsewhere there is no gain to share)."""
    out = {}
    for m, r, key in by:
        if m == method and r == ratio and ("rho1-exact", ratio, key) in by and ("standard", 1.0, key) in by:
            b, e = by["standard", 1.0, key]["eval_loss"], by["rho1-exact", ratio, key]["eval_loss"]
            if b > e:
                out[key] = (b - by[m, r, key]["eval_loss"]) / (b - e)
    return dict(sorted(out.items()))


def type_table(results: list[dict], ratio: float) -> list[str]:
    """Clean held-out loss by kind of token (final models, mean over runs) of
    standard, Rho-1 exact and Centrifuge at ``ratio``, Centrifuge's share of
    Rho-1's gain per kind (paired), and the share of each kind that Rho-1's
    selection keeps (excess loss of Rho-1 exact's final model)."""
    by = {(r["method"], pair_key(r)): r for r in results if r.get("by_type")
          and r["ratio"] == (1.0 if r["method"] == "standard" else ratio)}  # fmt: skip
    keys = sorted(k for (m, k) in by if m == "rho1-centrifuge"
                  and ("rho1-exact", k) in by and ("standard", k) in by)  # fmt: skip
    if not keys:
        return []

    def loss(method, kind):
        return [by[method, k]["by_type"][kind]["loss"] for k in keys]

    lines = ["", f"Clean held-out loss by kind of token, ρ = {ratio:g} ({len(keys)} paired seeds, final "
             "models); kept: the share of the kind that Rho-1 exact's final model would select.", "",
             "| kind | tokens | kept | standard | Rho-1 exact | Centrifuge | share of the gain |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, v in by["rho1-exact", keys[0]]["by_type"].items():
        std, exact, mine = loss("standard", kind), loss("rho1-exact", kind), loss("rho1-centrifuge", kind)
        share = [(b - m) / (b - e) for b, e, m in zip(std, exact, mine) if b > e]
        kept = [by["rho1-exact", k]["by_type"][kind]["kept"] for k in keys]
        lines.append(f"| {kind} | {v['tokens']} | {fmt(kept, 2)} | {fmt(std)} | {fmt(exact)} | {fmt(mine)} | "
                     f"{percent(share)} |")  # fmt: skip
    return lines


def plot(results: list[dict], s: Scale, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    g = groups(results)
    colors = {"standard": "tab:gray", "rho1-exact": "tab:blue", "rho1-centrifuge": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for method in colors:
        rs = g.get((method, 1.0 if method == "standard" else s.headline_ratio), [])
        if not rs:
            continue
        steps = [p["tokens"] for p in rs[0]["curve"]]
        ys = [[r["curve"][i]["loss"] for r in rs if len(r["curve"]) > i] for i in range(len(steps))]
        mean = [statistics.fmean(y) for y in ys]
        label = method if method == "standard" else f"{method} ρ={s.headline_ratio:g}"
        ax.plot(steps, mean, "o-", color=colors[method], label=f"{label} (n={len(rs)})")
        ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colors[method], alpha=0.2)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("clean held-out loss")
    ax.set_title("eval loss during training (band: min–max over seeds)")
    ax.legend()
    for ax, key, label, scale in ((axes[1], "eval_loss", "clean held-out loss", 1.0),
                                  (axes[2], "eval_accuracy", "answer accuracy (%)", 100.0)):  # fmt: skip
        base = g.get(("standard", 1.0), [])
        if base:
            m, sd = mean_std([r[key] * scale for r in base])
            ax.axhline(m, color=colors["standard"], label="standard (all tokens)")
            if not math.isnan(sd):
                ax.axhspan(m - sd, m + sd, color=colors["standard"], alpha=0.15)
        for method in ("rho1-exact", "rho1-centrifuge"):
            pts = sorted((r, g[(method, r)]) for (mm, r) in g if mm == method)
            if not pts:
                continue
            xs = [r for r, _ in pts]
            ms = [mean_std([x[key] * scale for x in rs]) for _, rs in pts]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[0 if math.isnan(sd) else sd for _, sd in ms],
                        fmt="o-", capsize=4, color=colors[method], label=method)  # fmt: skip
        ax.set_xlabel("kept ratio ρ")
        ax.set_ylabel(label)
        ax.set_title(f"final {label} vs ρ (mean ± std)")
        ax.legend()
    fig.suptitle(f"Utility, {s.model} on the built-in corpus ({s.steps} steps × "
                 f"{s.batch_size * s.seq_len} tokens)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: list[dict], s: Scale, out: Path, suffix: str = "") -> list[Path]:
    """Clean held-out loss and answer accuracy during training, against training
    tokens (``curves-tokens.png``) and against training seconds
    (``curves-time.png``): every method at the headline ρ, mean over seeds at each
    evaluation (band: min-max)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    g = groups(results)
    methods = [k for k in sorted(g) if k[1] == s.headline_ratio or k[0] == "standard"]
    paths = []
    x_of = {"tokens": lambda r, p: p["tokens"], "time": lambda r, p: steady_s(r, p["step"])}
    for name, x_label in (("tokens", "training tokens"),
                          ("time", "training seconds (steps × median step time)")):  # fmt: skip
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, (y_key, y_label, scale) in zip(axes, (("loss", "clean held-out loss", 1.0),
                                                      ("accuracy", "answer accuracy (%)", 100.0))):  # fmt: skip
            for method, ratio in methods:
                rs = g[(method, ratio)]
                n = min(len(r["curve"]) for r in rs)
                xs = [statistics.fmean(x_of[name](r, r["curve"][i]) for r in rs) for i in range(n)]
                ys = [[scale * r["curve"][i][y_key] for r in rs] for i in range(n)]
                label = method if method == "standard" else f"{method} ρ={ratio:g}"
                line, = ax.plot(xs, [statistics.fmean(y) for y in ys], "o-", label=f"{label} (n={len(rs)})")
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.legend(fontsize=7)
        fig.suptitle(f"{s.model}: clean held-out metrics against {x_label}")
        fig.tight_layout()
        path = out / f"curves-{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --- main ---------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Option defaults, and the docstring's commands as written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=HelpFormatter)  # the docstring: how to rerun each table
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="output directory (none: runs/utility-<scale>)")
    p.add_argument("--device", default=None, help="override the scale's device")
    p.add_argument("--steps", type=int, default=None, help="override the scale's steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the headline seeds")
    p.add_argument("--side-seeds", type=int, nargs="*", default=None,
                   help="override the seeds of the other ratios")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; runs that would start after it are skipped (and listed)")
    p.add_argument("--knobs", nargs="*", default=None, metavar="SPEC",
                   help="override the scale's quality knobs (BackwardOptions.parse specs, e.g. "
                        "extra=0.5,extra_weight=1.5 exact_layers=2 exact_top=2 kv_projections=1 "
                        "backward_ratio=0.75; none: no knob runs)")
    p.add_argument("--equal-time", action="store_true",
                   help="also train Rho-1 Centrifuge for Rho-1 exact's training time at the headline "
                        "ρ (on by default in the full scales)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the compared runs replay their steps from CUDA graphs (centrifuge train "
                        "--cuda-graphs), where small models' steps are set by the host; the base "
                        "and the reference train eagerly")
    p.add_argument("--inits", nargs="+", choices=sorted(INITS), default=None,
                   help="override the scale's inits: scratch and/or base (continued training)")
    p.add_argument("--runs", nargs="+", default=None, metavar="GLOB",
                   help="train only the runs whose names match (e.g. 'cont-*-s0'); the others "
                        "are listed as not run, earlier results in --out are reported")
    p.add_argument("--work", type=Path, default=None,
                   help="directory for checkpoints, the base, the reference and the token cache "
                        "(none: --out); results and metrics always go to --out")
    p.add_argument("--prune", action="store_true",
                   help="delete each run's checkpoints once evaluated (large models)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md and curves.png from --out's results.json")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="train only shard K of N of the run list (0-based; one process per GPU, "
                        "each with its own --out; --merge joins them)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="with --report-only: report the runs of these directories' results.json "
                        "(shards of one experiment) together in --out")
    p.add_argument("--prices", type=Path, default=None, metavar="BENCH_JSON",
                   help="a `centrifuge bench` JSON with the same knobs (--knob): adds each "
                        "variant's backward and step time over dense (the Pareto table)")
    return p.parse_args(argv)



def start(s, args, out: Path) -> None:
    """Before the first run: the scale's device exists, its thread count, and
    ``--fresh`` clears ``out`` (then created)."""
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"scale {args.scale!r} wants {s.device}, but CUDA is not available "
                         "(use --scale smoke, or --device cpu)")  # fmt: skip
    if s.threads:
        torch.set_num_threads(s.threads)  # tiny models: more threads only add contention
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    s = SCALES[args.scale]
    if args.device:
        s.device = args.device
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        s.seeds = args.seeds
    if args.side_seeds is not None:
        s.side_seeds = args.side_seeds
    if args.knobs is not None:
        s.knobs = args.knobs
    if args.inits:
        s.inits = args.inits
    if args.equal_time:
        s.equal_time = True
    if args.cuda_graphs:
        s.cuda_graphs = True
    if "base" in s.inits and s.base_steps < 1:
        raise SystemExit(f"scale {args.scale!r} has no base model (base_steps = 0): use --inits scratch")
    for knob in s.knobs:
        knob_options(knob)  # a bad spec fails here, before any training
    out = args.out or Path("runs") / f"utility-{args.scale}"
    prices = bench_prices(args.prices, s.headline_ratio) if args.prices else None
    shard = parse_shard(args.shard) if args.shard else None
    if args.report_only:
        saved = merge_results(args.merge) if args.merge else json.loads((out / "results.json").read_text())
        out.mkdir(parents=True, exist_ok=True)
        s = Scale(**saved["meta"]["config"])
        m = saved["meta"]
        write_report(out, s, saved["runs"], m["skipped"], m["reference_eval"], args,
                     device=m["device"], check=m.get("gradient_check"), failed=m.get("failed", ()),
                     base=m.get("base"), prices=prices or m.get("prices"),
                     rebuilds=m.get("rebuilds"))  # fmt: skip
        print((out / "results.md").read_text())
        return 0
    start(s, args, out)
    work = args.work or out
    cache = work / "cache"

    def say(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    # 1. Data: the noisy training documents and the clean reference documents.
    work.mkdir(parents=True, exist_ok=True)
    train_data = write_jsonl(work / "train.jsonl", corpus.documents("train", seed=0, n=s.train_docs))
    clean_data = write_jsonl(work / "clean.jsonl", corpus.documents("clean", seed=0, n=s.clean_docs))
    tok = load_tokenizer("byte")
    eval_ds = load_dataset(None, tok, s.seq_len, split="eval", cache_dir=cache, seed=0)

    # 1b. Continued training: a base model pretrained on general text first.
    base, base_info = None, None
    if "base" in s.inits:
        base, base_info = pretrain_base(s, work, cache, eval_ds, say)

    # 2. The reference model, trained on clean data only (Rho-1's recipe), from
    # the base when there is one (as Rho-1 initialises its reference).
    ref_dir = work / "reference"
    if not (ref_dir / "latest").is_file():
        say(f"training the reference model on {s.clean_docs} clean documents ({s.ref_steps} steps)")
        init = {} if base is None else dict(model=str(base), lr=s.lr)
        cfg = base_config(s, clean_data, ref_dir, cache, select="none", steps=s.ref_steps, seed=1000,
                          overwrite=True, **init)  # an unfinished reference starts over
        train(cfg, progress=False)
    ref_ckpt = checkpoints(ref_dir)[-1][1]
    ref_eval = evaluate_checkpoint(ref_ckpt, eval_ds, s)
    ref_model = LlamaForCausalLM.from_pretrained(ref_ckpt).to(s.device)  # for the runs' token-type breakdown
    say(f"reference: clean eval loss {ref_eval['loss']:.4f}, accuracy {ref_eval['accuracy']:.3f}")

    # 3. Reference scores of the training corpus, with the user-facing command.
    scores = work / "scores"
    say("scoring the training corpus: centrifuge score")
    rc = centrifuge_cli(["score", "--model", str(ref_dir), "--data", str(train_data), "--tokenizer",
                         "byte", "--seq-len", str(s.seq_len), "--cache-dir", str(cache), "--out",
                         str(scores), "--batch-size", str(4 * s.batch_size), "--device", s.device,
                         "--precision", s.dtype])  # fmt: skip
    if rc:
        return rc

    # An earlier call's check of the same settings stands (in fp32 it compiles and
    # tunes every kernel once more: two minutes of a ten-minute device call).
    saved = earlier_saved(out, s)
    check = saved.get("meta", {}).get("gradient_check")
    if not check or set(check) != {"amplified", "exact", *s.knobs}:
        check = gradient_check(s, train_data, scores, cache)
    say("gradients vs the reference semantics (relative error): "
        + ", ".join(f"{k} {v:.2e}" for k, v in check.items()))
    if max(check.values()) > 1e-2:
        raise SystemExit(f"gradient check failed on {s.device}: {check}")

    # 4. The runs. An earlier call's results count as done: its per-run files, or
    # its results.json alone (a GPU machine may hand back only the top level).
    results, skipped, durations, failed = [], [], [], []
    earlier = earlier_results(out, saved)
    runs = plan_runs(s)
    if shard:
        runs = shard_runs(runs, *shard)
    for i, spec in enumerate(runs):
        if spec.name in earlier:
            results.append(earlier[spec.name])
            continue
        if args.runs and not any(fnmatch.fnmatch(spec.name, pat) for pat in args.runs):
            skipped.append(spec.name)
            continue
        elapsed = time.perf_counter() - t0
        if args.time_budget is not None:  # a run's length is known after the first
            if elapsed + 1.2 * max(durations, default=0.0) > args.time_budget:
                skipped.append(spec.name)
                continue
        if spec.method == EQUAL_TIME:
            steps = equal_time_steps(spec, s, results)
            if steps is None:  # its equal-token pair did not run
                skipped.append(spec.name)
                continue
            spec = replace(spec, steps=steps)
        t_run = time.perf_counter()
        try:
            r = run_one(spec, s, train_data, scores, out, cache, eval_ds, base, work, args.prune,
                        (ref_eval["loss"], ref_model))
        except Exception as e:  # keep the other runs' results; report this one as failed
            failed.append(f"{spec.name} ({type(e).__name__}: {e})")
            say(f"run {i + 1}/{len(runs)} {spec.name} FAILED: {type(e).__name__}: {e}")
            continue
        durations.append(time.perf_counter() - t_run)  # training and its evaluations
        results.append(r)
        say(f"run {i + 1}/{len(runs)} {spec.name}: clean eval loss {r['eval_loss']:.4f}, "
            f"accuracy {r['eval_accuracy']:.3f}, {r['ms_per_step']:.1f} ms/step")
        write_report(out, s, results, skipped, ref_eval, args, check=check, failed=failed,
                     base=base_info, prices=prices)  # fmt: skip
    write_report(out, s, results, skipped, ref_eval, args, check=check, failed=failed, base=base_info,
                 prices=prices)  # fmt: skip
    print((out / "results.md").read_text())
    say(f"done: {out / 'results.md'}, {out / 'curves.png'}")
    return 0


# Scale fields that choose which runs exist, not how a run trains: an earlier
# call that differs only in these still ran the same runs.
RUN_LIST_FIELDS = ("seeds", "side_seeds", "ratios", "knobs", "inits", "equal_time", "threads")


def run_settings(config: dict) -> dict:
    """A scale's fields that decide how a run trains (as saved in results.json)."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in RUN_LIST_FIELDS}


def earlier_saved(out: Path, s: Scale) -> dict:
    """``out``'s results.json if its runs trained as ``s`` trains them, else {}."""
    saved = out / "results.json"
    if saved.exists():
        data = json.loads(saved.read_text())
        # A field added since it was saved counts with its default.
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                    for f in fields(s) if f.default is not MISSING or f.default_factory is not MISSING}  # fmt: skip
        if run_settings(defaults | data["meta"]["config"]) == run_settings(asdict(s)):
            return data
    return {}


def earlier_results(out: Path, saved: dict) -> dict[str, dict]:
    """Results of earlier calls into ``out``, by run name: from ``saved`` (its
    results.json when the runs trained as this call trains them,
    :func:`earlier_saved`), and from per-run result.json files (which win)."""
    found = {r["name"]: r for r in saved.get("runs", [])}
    for f in sorted(out.glob("runs/*/result.json")):
        found[f.parent.name] = json.loads(f.read_text())
    return found


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard {text!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard {text!r}: K must be in 0..N-1")
    return k, n


def merge_results(dirs: list[Path]) -> dict:
    """One results.json from the shards' ones: the same experiment (scale
    settings, reference, gradient check of the first), every run once (a run
    trained again from a rebuilt base and reference counts as another run)."""
    parts = [json.loads((d / "results.json").read_text()) for d in dirs]
    meta = parts[0]["meta"]
    for d, part in zip(dirs[1:], parts[1:]):
        if run_settings(part["meta"]["config"]) != run_settings(meta["config"]):
            raise SystemExit(f"--merge: {d} ran other scale settings than {dirs[0]}")
    knobs = list(dict.fromkeys(k for part in parts for k in part["meta"]["config"]["knobs"]))
    checks = {k: v for part in parts for k, v in (part["meta"].get("gradient_check") or {}).items()}
    rebuilds = [dict(base=(p["meta"].get("base") or {}).get("eval", {}).get("loss", math.nan),
                     reference=p["meta"]["reference_eval"]["loss"]) for p in parts]
    rebuilds = list({r["reference"]: r for r in rebuilds}.values())
    meta = dict(meta, config=dict(meta["config"], knobs=knobs), gradient_check=checks, rebuilds=rebuilds)
    runs = {(r["name"], r.get("reference_loss")): r for part in parts for r in part["runs"]}
    names = {name for name, _ in runs}
    skipped = [n for part in parts for n in part["meta"]["skipped"] if n not in names]
    failed = [f for part in parts for f in part["meta"].get("failed", [])]
    meta = dict(meta, skipped=list(dict.fromkeys(skipped)), failed=failed)
    return dict(meta=meta, runs=list(runs.values()))


def write_report(out: Path, s: Scale, results, skipped, ref_eval, args, device=None, check=None,
                 failed=(), base=None, prices=None, rebuilds=None) -> None:  # fmt: skip
    dev = device or s.device
    if device is None and dev.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    elif device is None and dev == "cpu":
        dev = f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    meta = dict(scale=args.scale, device=dev, skipped=skipped, failed=list(failed),
                reference_eval=ref_eval, gradient_check=check, torch=torch.__version__, prices=prices,
                config=asdict(s), base=base, rebuilds=rebuilds)  # fmt: skip
    (out / "results.json").write_text(json.dumps(dict(meta=meta, runs=results), indent=1))
    md = to_markdown(results, s, meta)
    if base:
        md += (f"\nBase model ({base['steps']} steps on {base['text']}, {base['tokens']:,} tokens): "
               f"clean eval loss {base['eval']['loss']:.4f}, answer accuracy "
               f"{100 * base['eval']['accuracy']:.1f}%.")  # fmt: skip
    md += (f"\nReference model (clean data only): clean eval loss {ref_eval['loss']:.4f}, "
           f"answer accuracy {100 * ref_eval['accuracy']:.1f}%.\n")  # fmt: skip
    if rebuilds and len(rebuilds) > 1:
        md += ("The shards rebuilt the base and the reference on their own; GPU training is not "
               "bit-reproducible, so they differ (" + "; ".join(
                   f"base {r['base']:.4f}, reference {r['reference']:.4f}" for r in rebuilds)
               + " clean eval loss). Runs are paired only with runs of the same reference.\n")
    if check:
        md += ("Gradient check before the runs (relative error vs the reference semantics, "
               "fp32): " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + ".\n")
    if failed:
        md += "Failed runs: " + "; ".join(failed) + ".\n"
    (out / "results.md").write_text(md)
    for i, init in enumerate(inits_in(results)):
        mine = [r for r in results if init_of(r) == init]
        plot(mine, s, out / ("curves.png" if i == 0 else f"curves-{init}.png"))
        plot_curves(mine, s, out, "" if i == 0 else f"-{init}")


if __name__ == "__main__":
    sys.exit(main())
