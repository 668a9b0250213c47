"""``centrifuge bench``: argument parsing and output files."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from centrifuge.bench.multi import MODES, run_multi_bench
from centrifuge.bench.multi import to_markdown as multi_markdown
from centrifuge.bench.report import to_markdown, write
from centrifuge.distributed import shutdown_distributed
from centrifuge.bench.runner import DTYPES, BenchConfig, run_bench


def add_arguments(p) -> None:
    d = BenchConfig()
    p.add_argument("--model", "--preset", dest="preset", default=d.preset, metavar="NAME",
                   help="model preset, random weights (see centrifuge.models.PRESETS)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=d.batch,
                   help="rows per step")
    p.add_argument("--ratios", type=float, nargs="+", default=d.ratios, help="kept ratios ρ")
    p.add_argument("--layers", type=int, default=None,
                   help="use only this many layers (large models on one GPU; labeled as such)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype,
                   help="compute dtype (the weights and activations are in it)")
    p.add_argument("--device", default=d.device, help="cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed rounds before the timed ones")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds (median reported)")
    p.add_argument("--no-hf", dest="hf", action="store_false",
                   help="skip the Hugging Face transformers baseline")
    p.add_argument("--liger", action="store_true",
                   help="use HF + Liger-Kernel as the peer instead of plain HF (needs liger-kernel)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="also time every variant with activation checkpointing (HF peers: "
                        "gradient_checkpointing_enable)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="LoRA fine-tuning: peft adapters of this rank on every projection, "
                        "base weights frozen (needs peft)")
    p.add_argument("--breakdown-ratio", type=float, default=d.breakdown_ratio,
                   help="ρ at which the backward is profiled by component (CUDA only)")
    p.add_argument("--parallel", nargs="+", choices=MODES, default=None, metavar="MODE",
                   help="under torchrun: time the native steps with these data-parallel modes "
                        f"({', '.join(MODES)}) next to one GPU")  # fmt: skip
    p.add_argument("--no-single", dest="single", action="store_false",
                   help="with --parallel: skip the one-GPU timing (models too large for one GPU)")
    p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="SPEC",
                   help="also time Centrifuge with a quality knob, e.g. extra=0.3, "
                        "extra=0.5,extra_weight=1.5, exact_layers=2, exact_top=2, "
                        "kv_projections=1 or backward_ratio=0.7 (the rows ranked next, up to that "
                        "share, in the backward without a loss; every ratio at most it) "
                        "(repeatable; keys: extra, extra_weight, exact_layers, exact_top, "
                        "kv_projections, path, context, backward_ratio)")
    p.add_argument("--prompt-share", type=float, default=0.0, metavar="S",
                   help="time supervised fine-tuning: the first S of every row is a prompt "
                        "labelled -100 (plain SFT as dense; Centrifuge with the prompt in the "
                        "backward and, as centrifuge+context-constant, as constants); native steps only")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time every native step captured as CUDA graphs (-graph rows: the "
                        "host issues one launch per forward and backward; CUDA only); sampled rows "
                        "(extra) wait for the host and are not captured")
    p.add_argument("--out-dir", "--out", dest="out", type=Path, default=Path("runs/bench"),
                   help="output directory")


def run(args) -> int:
    cfg = BenchConfig(
        preset=args.preset, seq_len=args.seq_len, batch=args.batch, ratios=args.ratios,
        layers=args.layers, dtype=args.dtype, device=args.device, warmup=args.warmup,
        repeats=args.repeats, hf=args.hf, liger=args.liger, breakdown_ratio=args.breakdown_ratio,
        activation_checkpointing=args.activation_checkpointing, lora=args.lora, knobs=args.knobs,
        prompt_share=args.prompt_share, cuda_graphs=args.cuda_graphs,
    )  # fmt: skip
    layers = f"-{cfg.layers}l" if cfg.layers else ""
    if args.parallel:
        if cfg.activation_checkpointing or cfg.lora or cfg.prompt_share:
            raise ValueError("--activation-checkpointing, --lora and --prompt-share time one GPU; "
                             "they do not combine with --parallel yet")  # fmt: skip
        result = run_multi_bench(cfg, args.parallel, single=args.single, progress=tqdm)
        shutdown_distributed()
        if result is None:  # not rank 0
            return 0
        stem = f"{cfg.preset}{layers}-s{cfg.seq_len}-b{cfg.batch}-{cfg.dtype}-{result['environment']['gpus']}gpu"
        md = multi_markdown(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{stem}.md").write_text(md + "\n")
        print(md)
        print(f"wrote {args.out / stem}.json, .md")
        return 0
    result = run_bench(cfg, progress=tqdm)
    peer = "-liger" if cfg.liger else ""
    ckpt = "-ckpt" if cfg.activation_checkpointing else ""
    lora = f"-lora{cfg.lora}" if cfg.lora else ""
    sft = f"-sft{round(100 * cfg.prompt_share)}" if cfg.prompt_share else ""
    graphs = "-graphs" if cfg.cuda_graphs else ""
    stem = f"{cfg.preset}{layers}-s{cfg.seq_len}-b{cfg.batch}-{cfg.dtype}{peer}{ckpt}{lora}{sft}{graphs}"
    paths = write(result, args.out, stem)
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
