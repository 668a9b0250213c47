"""``centrifuge score``: store every token's reference-model loss beside a
dataset, for ``centrifuge train --select rho1 --reference-scores PATH``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from centrifuge.data.formats import FORMATS
from centrifuge.device import resolve_device
from centrifuge.scoring.checkpoint import load_checkpoint
from centrifuge.scoring.score import PRECISIONS, score_dataset
from centrifuge.scoring.store import DTYPES, score_path_for


def default_seq_len() -> int:
    """The trainer's default, so that default scores fit a default training run."""
    try:
        from centrifuge.training import TrainConfig

        return int(TrainConfig().seq_len)
    except Exception:  # the training package is optional here
        return 512


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse reports anything else)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def add_dataset_arguments(p, split_default: str = "train") -> None:
    """Options that pick the dataset; scoring and training must agree on them."""
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text/JSONL/Parquet/Arrow files or directories (none: the built-in corpus)")
    p.add_argument("--data-format", choices=FORMATS, default="auto",
                   help="how a record becomes a document: text, prompt-completion (the loss on "
                        "the completion only), messages (on the assistant turns only) or auto, "
                        "by the first record's fields (the trainer's --data-format)")
    p.add_argument("--text-field", default="text",
                   help="JSONL/Parquet/Arrow field holding the text (the trainer's --text-field)")
    p.add_argument("--prompt-field", default="prompt",
                   help="field holding the prompt of prompt-completion records")
    p.add_argument("--completion-field", default="completion",
                   help="field holding the completion of prompt-completion records")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer directory or 'byte' (none: the model directory's "
                        "tokenizer.json if any, else the built-in byte tokenizer)")
    p.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help="packed row length (none: the trainer's default)")
    p.add_argument("--split", default=split_default, help="dataset split")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the built-in corpus (the trainer's --seed)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="token cache root (none: $CENTRIFUGE_CACHE or ~/.cache/centrifuge)")


def load_dataset_from_args(args, model_dir: Path | None = None):
    """The dataset the options name. Without --tokenizer, a tokenizer.json in
    the model's directory is used (as the trainer does), else the byte tokenizer."""
    from centrifuge.data import load_dataset, load_tokenizer

    name = args.tokenizer
    if name is None and model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        name = str(model_dir)
    tok = load_tokenizer(name)
    seq_len = default_seq_len() if args.seq_len is None else args.seq_len
    ds = load_dataset(args.data, tok, seq_len, split=args.split, cache_dir=args.cache_dir,
                      seed=args.data_seed, data_format=args.data_format, text_field=args.text_field,
                      prompt_field=args.prompt_field, completion_field=args.completion_field)  # fmt: skip
    return ds, tok


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="CHECKPOINT",
                   help="reference model: a native or Hugging Face Llama-family checkpoint "
                        "directory, or a training run directory (its latest checkpoint)")
    add_dataset_arguments(p)
    p.add_argument("--out", type=Path, default=None,
                   help="score store directory (none: beside the dataset's token cache)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="rows per forward")
    p.add_argument("--device", default=None, help="none: cuda if available, else cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="compute precision of the reference forward")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="stored precision (float16 halves the file)")
    p.add_argument("--chunk-rows", type=int_at_least(1), default=None,
                   help="rows per committed chunk (an interrupted run resumes from the last one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store made differently instead of refusing")


def run(args) -> int:
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.model, device)
    ds, _ = load_dataset_from_args(args, ckpt)
    out = args.out
    if out is None:
        from centrifuge.scoring.score import model_identity

        out = score_path_for(ds, model_identity(model)["digest"][:16])
    try:
        res = score_dataset(model, ds, out, batch_size=args.batch_size, device=device,
                            precision=args.precision, dtype=args.dtype, chunk_rows=args.chunk_rows,
                            overwrite=args.overwrite, model_source=str(ckpt), progress=tqdm)  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted: the chunks scored so far are kept in {out}; the same command "
              "continues from there", file=sys.stderr)  # fmt: skip
        raise
    if res["resumed_from"] == res["rows"]:
        print(f"{out}: already complete ({res['rows']} rows)")
    elif res["resumed_from"]:
        print(f"{out}: resumed at row {res['resumed_from']}, now complete ({res['rows']} rows)")
    else:
        print(f"{out}: scored {res['rows']} rows")
    print(f"train with: centrifuge train --select rho1 --reference-scores {out} "
          "(and the same --data/--tokenizer/--seq-len)")
    return 0
