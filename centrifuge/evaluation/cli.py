"""``centrifuge eval CHECKPOINT``: held-out loss and perplexity on clean data,
and the built-in corpus' answer accuracy, for a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from centrifuge.device import resolve_device
from centrifuge.io import write_text_atomic
from centrifuge.scoring.checkpoint import load_checkpoint
from centrifuge.scoring.cli import add_dataset_arguments, int_at_least, load_dataset_from_args


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (native or Hugging Face "
                   "Llama-family), or a training run directory (its latest checkpoint)")
    add_dataset_arguments(p, split_default="eval")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="rows per forward")
    p.add_argument("--device", default=None, help="none: cuda if available, else cpu")
    p.add_argument("--max-rows", type=int_at_least(1), default=None, help="evaluate at most this many rows")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def format_results(res: dict) -> str:
    acc = res.get("accuracy")
    lines = [
        f"checkpoint  {res['checkpoint']}",
        f"data        {res['data']} (split {res['split']}, {res['rows']} rows x {res['seq_len']})",
        f"loss        {res['loss']:.4f}",
        f"perplexity  {res['perplexity']:.3f}",
        "accuracy    " + ("n/a (no task metric for this data)" if acc is None else f"{acc:.4f}"),
    ]
    return "\n".join(lines)


def run(args) -> int:
    from centrifuge.evaluation import evaluate

    if args.json is not None and args.json.is_dir():
        raise ValueError(f"--json {args.json} is a directory; give a file name")
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    ds, _ = load_dataset_from_args(args, ckpt)
    metrics = evaluate(model, ds, args.batch_size, device, max_rows=args.max_rows)
    if not math.isfinite(metrics["loss"]):
        raise ValueError(f"the held-out loss of {ckpt} is not finite: {metrics['loss']}")
    rows = len(ds) if args.max_rows is None else min(len(ds), args.max_rows)
    data = "built-in corpus" if args.data is None else ", ".join(args.data)
    res = dict(checkpoint=str(ckpt), data=data, split=args.split, rows=rows, seq_len=ds.seq_len,
               **metrics)  # fmt: skip
    print(format_results(res))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(res, indent=2))
    return 0
