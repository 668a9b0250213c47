"""Gradient diagnosis: how far each backward setting's gradient is from the exact
masked-loss gradient, by parameter group and layer, before any training run.

    python scripts/gradient_diagnosis.py                                  # CPU, mini preset
    python scripts/gradient_diagnosis.py --model runs/base --reference runs/reference \\
        --select rho1 --ratio 0.5 --seq-len 2048 --batch-size 16 --device cuda --out diag.json
    python scripts/gradient_diagnosis.py --setting amplified= --setting bottom2=exact_layers=2 \\
        --setting top2=exact_top=2 --setting kvproj=kv_projections=1 \\
        --setting sampled=extra=0.5,extra_weight=1.5 --setting next=backward_ratio=0.7 --samples 16

Every setting runs on the same batches and keep masks (selected once, with the
model's own loss or Rho-1's excess loss over ``--reference``). A setting is
``NAME=SPEC`` with SPEC as ``centrifuge bench --knob`` takes it
(``BackwardOptions.parse``; an empty SPEC is the plain amplified backward).
Sampled settings (``extra``) are averaged over ``--samples`` draws; a
``backward_ratio`` setting adds the rows the same selection ranks next (its
ratio must be at least ``--ratio``). The report:
cosine similarity and relative error ``|g - g_exact| / |g_exact|`` over all
parameters, per group (embedding, q, k, v, o, mlp, norms, lm_head) and per
decoder layer; ``--out`` also keeps every group of every layer as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from centrifuge.data import load_dataset  # noqa: E402
from centrifuge.evaluation.gradient_error import agreement, model_gradients  # noqa: E402
from centrifuge.models import LlamaForCausalLM, build_model, get_preset  # noqa: E402
from centrifuge.plan import BackwardOptions  # noqa: E402
from centrifuge.scoring.checkpoint import resolve_checkpoint  # noqa: E402
from centrifuge.selection import Selector  # noqa: E402

DEFAULT_SETTINGS = ("amplified=", "exact_layers2=exact_layers=2", "exact_top2=exact_top=2",
                    "kv_projections=kv_projections=1", "context_constant=context=constant",
                    "extra0.5_w1.5=extra=0.5,extra_weight=1.5",
                    "backward0.75=backward_ratio=0.75")  # fmt: skip
GROUPS = ("all", "embedding", "q", "k", "v", "o", "mlp", "norms")


def load_model(spec: str, dtype, device):
    """A preset name (random weights, seed 0), or a checkpoint: its directory or
    a training run's directory (its ``latest``)."""
    if Path(spec).exists() or "/" in spec:  # a path: a missing one is named as such
        return LlamaForCausalLM.from_pretrained(resolve_checkpoint(spec), dtype=dtype).to(device)
    return build_model(get_preset(spec), dtype=dtype, device=device, seed=0)


def parse_settings(items) -> dict[str, BackwardOptions]:
    settings = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--setting {item!r}: expected NAME=SPEC, e.g. bottom2=exact_layers=2")
        settings[name] = BackwardOptions.parse(spec)
    return settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    p.add_argument("--model", default="mini", help="preset name or a checkpoint directory")
    p.add_argument("--data", nargs="*", default=None, help="data files (default: the built-in corpus)")
    p.add_argument("--select", choices=("loss", "rho1"), default="loss", help="how the keep mask is chosen")
    p.add_argument("--reference", default=None, help="reference checkpoint directory (rho1)")
    p.add_argument("--ratio", type=float, default=0.5, help="kept share of the labelled tokens")
    p.add_argument("--setting", action="append", default=None, metavar="NAME=SPEC",
                   help=f"a backward setting (repeatable; default: {' '.join(DEFAULT_SETTINGS)})")
    p.add_argument("--samples", type=int, default=8, help="draws averaged for sampled settings")
    p.add_argument("--batches", type=int, default=2, help="batches; the report is their mean")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32", help="model dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    p.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    args = p.parse_args(argv)
    if args.select == "rho1" and args.reference is None:
        raise SystemExit("--select rho1 needs --reference (a checkpoint directory)")
    settings = parse_settings(args.setting or DEFAULT_SETTINGS)
    for name, opts in settings.items():
        if (opts.backward_ratio or 1.0) < args.ratio:
            raise SystemExit(f"--setting {name}: backward_ratio {opts.backward_ratio:g} is below "
                             f"--ratio {args.ratio:g} (the backward set holds the kept rows)")  # fmt: skip
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    model = load_model(args.model, dtype, args.device)
    reference = None if args.reference is None else load_model(args.reference, dtype, args.device)
    ds = load_dataset(args.data, seq_len=args.seq_len)
    selector = Selector(args.select, args.ratio)
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for b in range(args.batches):
        cpu = ds.batch(range(b * args.batch_size, (b + 1) * args.batch_size))
        batch = {k: v.to(args.device) for k, v in cpu.items()}
        with torch.no_grad():
            out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
            ref = None
            if reference is not None:
                ref = reference(batch["input_ids"], labels=batch["labels"],
                                position_ids=batch["position_ids"]).token_loss  # fmt: skip
        keep = selector(out.token_loss, out.valid, ref)
        exact = model_gradients(model, batch, keep, "exact")
        for name, opts in settings.items():
            ranked = None
            if opts.backward_ratio is not None:  # the same scores, ranked further
                ranked = selector.select(out.token_loss, out.valid, ref, backward_ratio=opts.backward_ratio)[1]
            got = model_gradients(model, batch, keep, opts, args.samples if opts.extra > 0 else 1, ranked)
            results[name].append(agreement(got, exact))
    mean = {name: {key: {m: sum(r[key][m] for r in runs) / len(runs) for m in ("cosine", "rel_error")}
                   for key in runs[0]} for name, runs in results.items()}  # fmt: skip
    print(f"relative error |g - g_exact| / |g_exact| (cosine), {args.model}, ρ = {args.ratio}, "
          f"{args.batches} x {args.batch_size} x {args.seq_len} tokens")
    print("| setting | " + " | ".join(GROUPS) + " |")
    print("|---" * (len(GROUPS) + 1) + "|")
    for name, m in mean.items():
        cells = [f"{m[g]['rel_error']:.3f} ({m[g]['cosine']:.3f})" if g in m else "—" for g in GROUPS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    layers = sorted(int(k.split("/")[1]) for k in next(iter(mean.values())) if k.startswith("layer/"))
    print("\nper decoder layer, relative error:\n\n| setting | " + " | ".join(map(str, layers)) + " |")
    print("|---" * (len(layers) + 1) + "|")
    for name, m in mean.items():
        print(f"| {name} | " + " | ".join(f"{m[f'layer/{i}']['rel_error']:.3f}" for i in layers) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, mean=mean), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
