"""``centrifuge train``: token-filtered training from the command line.

With no arguments it trains the ``mini`` preset on the built-in corpus (math
problems with noisy spans) with Rho-1 selection against a reference model it
first trains on the corpus' clean split, and prints a summary."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from centrifuge.data.formats import FORMATS
from centrifuge.distributed import GRAD_SYNC_MODES, PARALLEL_MODES, RESHARD_MODES
from centrifuge.selection import GRANULARITIES, METHODS
from centrifuge.training.config import DTYPES, TrainConfig, read_config_file
from centrifuge.training.rundir import MAY_CHANGE, resume_config

S = argparse.SUPPRESS  # only options given on the command line override a --config file


def add_arguments(p) -> None:
    d = TrainConfig()

    p.add_argument("--config", default=S, metavar="FILE",
                   help="YAML, TOML or JSON file with the same options (keys with _ or -); "
                        "command-line options override it")  # fmt: skip
    g = p.add_argument_group("model and data")
    opt_g = lambda *a, **k: _opt(g, d, *a, **k)  # noqa: E731
    opt_g("--model", "preset name (e.g. mini, tiny, small, tinyllama-1.1b, qwen3-0.6b), a local "
          "Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3) or a training run "
          "directory (its latest checkpoint)", metavar="NAME|DIR")
    opt_g("--data", "text (.txt/.md), JSONL, Parquet or Arrow files, directories of them, or a "
          "datasets.save_to_disk directory; none = the built-in corpus", nargs="+", metavar="PATH")
    opt_g("--data-format", "how a JSONL/Parquet/Arrow record becomes a document: text (the "
          "text field), prompt-completion (supervised fine-tuning: the prompt field's tokens are "
          "context without a loss, the completion's are trained), messages (a conversation "
          "rendered by the tokenizer's chat template, its assistant turns trained), auto "
          "(prompt-completion when the first record has both fields, else messages when it has "
          "that field, else text)", choices=FORMATS)
    opt_g("--text-field", "JSONL/Parquet/Arrow field holding the text")
    opt_g("--prompt-field", "field holding the prompt (prompt-completion records)")
    opt_g("--completion-field", "field holding the completion (prompt-completion records)")
    opt_g("--tokenizer", "local Hugging Face tokenizer directory, or 'byte'; none = the model "
          "directory's tokenizer, else the built-in byte tokenizer", metavar="DIR")
    opt_g("--seq-len", "tokens per packed row", type=int)
    opt_g("--cache-dir", "token cache directory ($CENTRIFUGE_CACHE or ~/.cache/centrifuge if "
          "unset)", metavar="DIR")
    g = p.add_argument_group("token selection")
    opt_g = lambda *a, **k: _opt(g, d, *a, **k)  # noqa: E731
    opt_g("--select", "rho1: excess loss over a reference model (Rho-1); loss: the model's own "
          "loss; random; none: train on every token", choices=METHODS)
    opt_g("--ratio", "fraction ρ of tokens kept, in (0, 1]", type=float)
    opt_g("--granularity", "top-k over the whole micro-batch or inside each row",
          choices=GRANULARITIES)
    opt_g("--reference", "reference model directory (HF checkpoint or a training run) for rho1",
          metavar="DIR")
    opt_g("--reference-scores", "precomputed reference scores (from `centrifuge score`) for rho1",
          metavar="PATH")
    opt_g("--reference-steps", "built-in corpus without a reference: steps of the reference "
          "model trained first on the clean split", type=int)
    opt_g("--backward", "amplified: Centrifuge, the backward runs on kept tokens only; exact: "
          "masked loss with a dense backward (the usual token filtering)",
          choices=("amplified", "exact"))
    opt_g("--backward-extra", "amplified only: each filtered token before a kept one also joins "
          "the backward with probability P, its K/V gradient reweighted (1/P: an unbiased "
          "estimate of the exact backward's gradient); costs rho + (1 - rho) P of the rows",
          type=float, metavar="P")
    opt_g("--backward-extra-weight", "the K/V gradient weight of those tokens, in [1, 1/P] "
          "(default 1/P; smaller damps the noise, with some bias)", type=float, metavar="W")
    opt_g("--exact-layers", "amplified only: the bottom K decoder layers run the exact (dense) "
          "backward", type=int, metavar="K")
    opt_g("--exact-top", "amplified only: the top K decoder layers run the exact (dense) "
          "backward; below them the gradient stops at filtered tokens", type=int, metavar="K")
    opt_g("--kv-projections", "amplified only: filtered tokens' K/V gradients (from kept "
          "queries) train the K/V projections and norms, without reaching the tokens' residual "
          "stream", action="store_true")
    opt_g("--backward-path", "amplified only: how its backward is computed, same gradients: "
          "compact (gathered kept rows), dense (full-size GEMMs, filtered K/V gradients zeroed: "
          "small models) or auto (by the GEMM work per layer)",
          choices=("auto", "compact", "dense"))
    opt_g("--context-rows", "amplified only: tokens labelled -100 before a labelled one (SFT "
          "prompts): backward keeps them in the backward without a loss (plain SFT's gradient "
          "when every label is kept); constant treats them like filtered tokens (cheaper, "
          "another gradient)", choices=("backward", "constant"))
    opt_g("--backward-ratio", "amplified only: the labelled tokens the selection ranks next after "
          "the kept ones, up to this share (in [ratio, 1]), join the backward without a loss (as "
          "SFT prompts do); 1 = the exact gradient; costs that share of the rows; none = the kept "
          "tokens only", type=float, metavar="R")
    opt_g("--exact-every", "amplified only: run the exact backward (masked loss, dense) on every "
          "K-th optimizer step (steps K, 2K, ...), the amplified one on the others; 0 = never "
          "(the metric exact_backward says which ran)", type=int, metavar="K")
    opt_g("--exact-final", "amplified only: run the exact backward on the last share F of the "
          "optimizer steps (the last ceil(F x steps)); 0 = none", type=float, metavar="F")
    g = p.add_argument_group("optimization")
    opt_g = lambda *a, **k: _opt(g, d, *a, **k)  # noqa: E731
    opt_g("--batch-size", "rows per micro-batch", type=int)
    opt_g("--grad-accum", "micro-batches per optimizer step", type=int)
    opt_g("--lr", "peak learning rate (AdamW)", type=float)
    opt_g("--warmup-steps", "linear warm-up steps", type=int)
    opt_g("--min-lr-ratio", "cosine decay ends at lr x this", type=float)
    opt_g("--weight-decay", "AdamW weight decay (weight matrices only)", type=float)
    opt_g("--grad-clip", "max gradient norm, 0 = off", type=float)
    opt_g("--steps", "optimizer steps", type=int)
    opt_g("--max-tokens", "token budget (rows x seq_len); caps --steps", type=int)
    opt_g("--dtype", "fp32, or bf16 autocast with fp32 master weights", choices=DTYPES)
    opt_g("--activation-checkpointing", "decoder layers keep only their input; the backward "
          "recomputes the rest, on kept tokens only with --backward amplified", action="store_true")
    opt_g("--cuda-graphs", "replay micro-batches (one capture per shape) and the optimizer update "
          "from CUDA graphs (for small models, whose steps the host sets the pace of; "
          "--backward-path auto then takes the compact path); one CUDA process", action="store_true")
    opt_g("--device", "auto (cuda if available, else cpu), cpu, cuda, cuda:N; under torchrun "
          "each process takes cuda:LOCAL_RANK")
    opt_g("--parallel", "under torchrun: ddp, fsdp (FSDP2, sharded weights, gradients and "
          "optimizer state) or auto (ddp while the training state fits in half a GPU, else "
          "fsdp)", choices=PARALLEL_MODES)
    opt_g("--tp", "tensor parallelism (with sequence parallelism) over groups of N consecutive "
          "processes under torchrun: each layer's heads and MLP split N ways; the processes / N "
          "data-parallel replicas use fsdp", type=int, metavar="N")
    opt_g("--fsdp-reshard", "FSDP: off keeps each layer's gathered weights from forward to "
          "backward (faster), on gathers them again (less memory), auto: off while they take "
          "at most a quarter of a GPU", choices=RESHARD_MODES)
    opt_g("--fsdp-grad-sync", "FSDP with --grad-accum > 1: last reduce-scatters the gradients "
          "after a step's last micro-batch (fewest bytes, unsharded gradients in between), every "
          "after each (sharded gradients), auto: last while they take at most a tenth of a GPU",
          choices=GRAD_SYNC_MODES)
    opt_g("--seed", "seed of initialization, data order, selection and the built-in corpus",
          type=int)
    g = p.add_argument_group("evaluation, checkpoints, output")
    opt_g = lambda *a, **k: _opt(g, d, *a, **k)  # noqa: E731
    opt_g("--eval-interval", "evaluate every N steps (0 = at start and end only)", type=int)
    opt_g("--eval-rows", "held-out rows per evaluation", type=int)
    opt_g("--eval-problems", "held-out problems for the answer accuracy (built-in corpus)",
          type=int)
    opt_g("--save-interval", "checkpoint every N steps (0 = at the end only)", type=int)
    opt_g("--out-dir", "output directory: checkpoint-<step>/, latest, metrics.jsonl, "
          "loss_curves.png, options.json; one run per directory (a directory that holds a run "
          "needs --resume or --overwrite)", metavar="DIR")
    g.add_argument("--resume", nargs="?", const=True, default=S, metavar="CHECKPOINT",
                   help="continue exactly where the run in OUT_DIR stopped (finished, "
                        "interrupted or killed), or from the given checkpoint directory, with "
                        "the run's own options: give only those that may change "
                        f"({', '.join(resumable_flags())}; --grad-accum with grad_accum x "
                        "processes unchanged)")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", default=S,
                   help="start over in an OUT_DIR that holds a run, deleting that run (without "
                        "it, a new run there is refused)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", default=S, help="no progress bar or log lines")


def resumable_flags() -> list[str]:
    """The options that ``--resume`` lets change, as flags."""
    return [f"--{k.replace('_', '-')}" for k in MAY_CHANGE if k not in ("resume", "overwrite")]


def _opt(group, d, flag, help, **kw):
    name = flag[2:].replace("-", "_")
    default = getattr(d, name)
    shown = "none" if default is None else default
    group.add_argument(flag, default=S, help=f"{help} (default: {shown})", **kw)


def config_from_args(args) -> TrainConfig:
    """Options from --config and the command line (which wins); with --resume,
    the run's own options complete them (see :func:`rundir.resume_config`)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet", "debug")}
    if getattr(args, "config", None):
        given = {**TrainConfig.parse(read_config_file(args.config), f"config file {args.config}"),
                 **given}  # fmt: skip
    if given.get("resume"):
        return resume_config(given)
    return TrainConfig.from_dict(given)


def format_summary(s: dict) -> str:
    if s.get("steps_trained", s["steps"]) == 0:  # a finished run, resumed
        head = (f"already finished: {s['steps']} steps, none trained now (to train on, give a "
                f"larger budget: centrifuge train --resume --out-dir {s['out_dir']} --steps N, "
                f"N > {s['steps']}; the learning-rate schedule then follows N)")  # fmt: skip
    else:
        modes = (([s["parallel"]] if s.get("parallel", "none") != "none" else [])
                 + ([f"tp {s['tp']}"] if s.get("tp", 1) > 1 else []))  # fmt: skip
        head = (f"done: {s['steps']} steps in {s['wall_s']:.1f} s"
                + (f" ({s['processes']} processes, {', '.join(modes)})" if s.get("processes", 1) > 1 else ""))  # fmt: skip
    lines = [
        head,
        f"  tokens seen      {s['tokens_seen']:,}  (kept {s['tokens_kept']:,}, "
        f"{100 * s['kept_fraction']:.1f}% of labelled tokens)",
        f"  throughput       {s['tokens_per_s']:,.0f} tokens/s (training steps only)",
    ]
    if s["final_train_loss"] is not None:
        lines.append(f"  train loss       {s['final_train_loss']:.4f}  (kept tokens, mean of the last 10 steps)")
    if s["eval_loss"] is not None:
        start = s.get("initial_eval_loss")
        since = f"; {start:.4f} at step 0" if start is not None else ""
        lines.append(f"  eval loss        {s['eval_loss']:.4f}  (held out{since})")
    if s["eval_accuracy"] is not None:
        lines.append(f"  eval accuracy    {100 * s['eval_accuracy']:.1f}%  (exact answers, held-out problems)")
    if s.get("reference"):
        lines.append(f"  reference        {s['reference']}")
    lines.append(f"  checkpoint       {s['checkpoint']}")
    lines.append(f"  metrics          {s['metrics']}" + (f", plot {s['plot']}" if s.get("plot") else "")
                 + (f", TensorBoard {s['tensorboard']}" if s.get("tensorboard") else ""))
    return "\n".join(lines)


def continue_command(cfg: TrainConfig) -> str:
    """How to continue a stopped run: the same launch with ``--resume``; after
    a torchrun launch, torchrun's, and the one-process form (the step's
    micro-batches all in one process)."""
    resume = f"train --resume --out-dir {shlex.quote(str(cfg.out_dir))}"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return f"continue with: centrifuge {resume}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launch = f"torchrun --nproc-per-node {local}"
    if world > local:
        launch += f" --nnodes {world // local} --node-rank K --rdzv-endpoint HOST:PORT"
    one = f"centrifuge {resume} --grad-accum {cfg.grad_accum * (world // cfg.tp)}"
    if cfg.parallel in ("ddp", "fsdp"):
        one += " --parallel auto"
    if cfg.tp > 1:
        one += " --tp 1"
    return (f"continue with: {launch} -m centrifuge.cli {resume}"
            + (" (on every node K)" if world > local else "") + f"\n  or on one process: {one}")  # fmt: skip


def run(args) -> int:
    import torch.distributed as dist

    from centrifuge.distributed import shutdown_distributed
    from centrifuge.training.pipeline import train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, progress=not getattr(args, "quiet", False))
    except KeyboardInterrupt as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(continue_command(cfg), file=sys.stderr)
        if dist.is_initialized() and getattr(e, "stopped_cleanly", False):
            # Every process stopped after the same step and the checkpoint is
            # complete: a success for torchrun, which reports any other exit
            # status as a failure of the launch.
            shutdown_distributed()
            return 0
        raise
    if dist.is_initialized():  # torchrun: one summary, from rank 0
        main = dist.get_rank() == 0
        shutdown_distributed()
        if not main:
            return 0
    print(format_summary(summary))
    return 0
