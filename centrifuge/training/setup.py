"""Everything a run needs before its first step, in three parts.

:func:`check` reads and verifies every input — processes and device, the
checkpoint to resume, tokenizer, model, data, the reference, memory — and
writes nothing, so bad input leaves the output directory as it was (and the
corrected command is not refused as "already holds a run"). :func:`begin` makes
the first writes (``--overwrite`` deletes the old run; ``options.json``
records this one). :func:`build` makes the model (wrapped for DDP/FSDP) and the
reference losses. A built-in reference model is a run of its own, checked
with the run and trained between ``begin`` and ``build`` (by the caller:
setup never runs the training loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from centrifuge.cuda_graphs import use_compact_path
from centrifuge.distributed import (
    DistContext, choose_grad_sync, choose_parallel, choose_reshard, materialize, parallelize,
)
from centrifuge.models import PRESETS, LlamaForCausalLM, ModelConfig, build_model, get_preset
from centrifuge.models.llama import checkpoint_files, checkpoint_parameters, initial_parameters
from centrifuge.scoring.checkpoint import resolve_checkpoint
from centrifuge.training import checkpoint as ckpt_io
from centrifuge.training import rundir
from centrifuge.training.config import KNOBS, TrainConfig
from centrifuge.training.graphs import why_not_captured
from centrifuge.training.memory import check_memory

# Options that must match between a checkpoint and the run resuming from it
# (anything that changes the data order, the updates or the model). grad_accum
# is compared as grad_accum x processes: the global batch of a step.
RESUME_KEYS = ("seq_len", "batch_size", "select", "ratio", "granularity",
               "backward", "backward_extra", "backward_extra_weight", "exact_layers", "exact_top",
               "kv_projections", "backward_ratio", "exact_every", "exact_final",
               "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
               "dtype", "seed", "reference", "reference_scores", "reference_steps")  # fmt: skip


@dataclass
class Reference:
    """Where ``rho1``'s reference losses come from, checked: precomputed
    ``scores`` ([rows, seq_len] float array), a reference ``model``, or the
    built-in reference (``builtin``: its run, checked and still to train, or its
    finished checkpoint)."""

    desc: str | None = None
    scores: np.ndarray | None = None
    model: LlamaForCausalLM | None = None
    builtin: "Checked | Path | None" = None


@dataclass
class Checked:
    """A run's inputs, verified; nothing is written yet."""

    cfg: TrainConfig
    ctx: DistContext
    split: str
    label: str
    mc: ModelConfig
    model_dir: Path | None  # --model's checkpoint directory (None: a preset)
    initial: LlamaForCausalLM | None  # its weights (on the CPU), read, unless the run splits the model
    train_ds: object
    eval_ds: object | None
    resume_state: dict | None
    resume_path: Path | None
    parallel: str
    reference: Reference | None  # None: the selection needs none


@dataclass
class Run:
    """model: the module the step calls (DDP wrapper, FSDP-sharded or plain);
    module: the native model inside it (config, saving, evaluation)."""

    model: torch.nn.Module
    module: LlamaForCausalLM
    ctx: DistContext
    parallel: str
    train_ds: object
    eval_ds: object | None
    reference: object  # (rows: np.ndarray, batch: dict) -> [n, L] float32 losses, or None
    reference_desc: str | None
    resume_state: dict | None
    resume_path: Path | None
    model_config_dict: dict
    label: str
    title: str
    sync_every_micro_batch: bool = False  # FSDP reduce-scatters after each micro-batch

    @property
    def device(self) -> torch.device:
        return self.ctx.device


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def model_config(name: str) -> tuple[ModelConfig, Path | None]:
    """(config, checkpoint directory or None for a preset). A directory is a
    checkpoint or a training run's (its latest checkpoint)."""
    p = Path(name)
    if p.is_dir():
        d = resolve_checkpoint(p)
        return ModelConfig.from_pretrained(d), d
    if name in PRESETS:
        return get_preset(name), None
    raise ValueError(
        f"model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a local "
        "Hugging Face checkpoint directory"
    )


def pick_tokenizer(cfg: TrainConfig, model_dir: Path | None, progress: bool = True):
    from centrifuge.data import load_tokenizer

    if cfg.tokenizer is None and model_dir is not None:
        if (model_dir / "tokenizer.json").is_file():
            return load_tokenizer(model_dir)  # a checkpoint's own tokenizer
        _say(progress, f"note: {model_dir} has no tokenizer.json; using the built-in byte "
                       "tokenizer (pass --tokenizer to choose one)")  # fmt: skip
    return load_tokenizer(cfg.tokenizer)


def check_model_fits(mc: ModelConfig, cfg: TrainConfig, tokenizer, what: str = "model") -> None:
    if cfg.seq_len > mc.max_position_embeddings:
        raise ValueError(
            f"seq_len {cfg.seq_len} is larger than the {what} supports "
            f"(max_position_embeddings = {mc.max_position_embeddings})"
        )
    if mc.sliding_window is not None and cfg.seq_len > mc.sliding_window:
        raise ValueError(
            f"seq_len {cfg.seq_len} exceeds the {what}'s sliding window ({mc.sliding_window}), "
            "which is not supported"
        )
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the {what}'s vocabulary has "
            f"only {mc.vocab_size}: model and tokenizer do not match"
        )


def _option_diff(old: dict, cfg: TrainConfig) -> list[str]:
    """The options of ``RESUME_KEYS`` that differ from ``old``'s. Without selection
    the backward's knobs change nothing (a built-in reference of an earlier version
    carries its run's). An option that ``old`` lacks (saved by an earlier version)
    had its default."""
    keys = [k for k in RESUME_KEYS if cfg.select != "none" or k not in KNOBS]
    defaults = TrainConfig().to_dict()
    old = {k: old.get(k, defaults[k]) for k in keys}
    return [f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in keys if old[k] != getattr(cfg, k)]


def _check_resume(state: dict, cfg: TrainConfig, mc: ModelConfig, ckpt: Path, world: int,
                  progress: bool) -> None:  # fmt: skip
    old = state.get("config", {})
    diff = _option_diff(old, cfg)
    old_world = state.get("data_parallel", state.get("world_size", 1))
    if old.get("grad_accum", 1) * old_world != cfg.grad_accum * world:
        diff.append(f"grad_accum x processes: {old.get('grad_accum')} x {old_world} -> "
                    f"{cfg.grad_accum} x {world} (keep the product, the micro-batches of a step)")  # fmt: skip
    if diff:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {ckpt}: the run's options differ from the checkpoint's "
            f"({'; '.join(diff)})"
        )
    if state.get("model_config") != mc.to_hf_dict():
        raise ckpt_io.CheckpointError(
            f"cannot resume from {ckpt}: it holds a different model than {cfg.model!r}"
        )
    if old.get("steps") != cfg.steps or old.get("max_tokens") != cfg.max_tokens:
        _say(progress, f"note: the step/token budget changed since {ckpt.name}: the learning-rate "
                       "schedule follows the new budget")  # fmt: skip


def check(cfg: TrainConfig, ctx: DistContext, progress: bool = True, split: str = "train",
          label: str = "train") -> Checked:  # fmt: skip
    """Verify everything a run reads, writing nothing (the token cache aside).
    ``progress``: print notes (pass False off rank 0)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")

    rundir.check_fresh_start(cfg)

    # Resume: read and verify the checkpoint first, so a bad one fails fast.
    resume_state = resume_path = None
    if cfg.resume is True and not (out_dir / ckpt_io.LATEST).is_file():
        options = rundir.read_options(out_dir) if rundir.is_run(out_dir) else None
        if options is None:
            raise ckpt_io.CheckpointError(f"nothing to resume: {out_dir} holds no run "
                                          f"('{ckpt_io.LATEST}' is missing)")  # fmt: skip
        diff = _option_diff(options, cfg)
        if diff:
            raise ckpt_io.CheckpointError(f"cannot resume {out_dir}: the options differ from "
                                          f"{rundir.OPTIONS}'s ({'; '.join(diff)})")  # fmt: skip
        _say(progress, f"note: {out_dir} has no checkpoint yet: the run starts again from step 0")
    elif cfg.resume:
        resume_path = ckpt_io.resolve(out_dir if cfg.resume is True else Path(cfg.resume))
        resume_state = ckpt_io.load_trainer_state(resume_path)

    mc, model_dir = model_config(cfg.model)
    cfg.backward_options().check_layers(mc.num_layers)
    tokenizer = pick_tokenizer(cfg, model_dir, progress)
    check_model_fits(mc, cfg, tokenizer)
    if resume_state is not None:
        _check_resume(resume_state, cfg, mc, resume_path, ctx.dp_size, progress)
    if cfg.seq_len % ctx.tp:  # every micro-batch, evaluation's shorter last one included
        raise ValueError(f"tensor parallelism splits every micro-batch's rows over its {ctx.tp} "
                         f"ranks: seq_len {cfg.seq_len} must be a multiple of tp")  # fmt: skip
    parallel = choose_parallel(cfg.parallel, ctx, mc.num_parameters())
    # A model directory is checked now, so that a damaged file fails before any write
    # (a resumed checkpoint's files were verified against its manifest): read whole,
    # or, for a model that build() splits and fills shard by shard, from its headers.
    initial = None
    if model_dir is not None and resume_state is None:
        if splits_model(parallel, ctx):
            checkpoint_files(model_dir)
        else:
            initial = LlamaForCausalLM.from_pretrained(model_dir)
    check_memory(mc, cfg, ctx.device, ctx.world_size if parallel == "fsdp" else ctx.tp)

    # Rank 0 tokenizes into the shared cache first; the others then read it.
    train_ds = eval_ds = None
    for turn in ("main", "rest"):
        if (turn == "main") == ctx.is_main:
            train_ds, eval_ds = _datasets(cfg, tokenizer, split, progress)
        ctx.barrier()
    if resume_state is not None and resume_state.get("data_fingerprint") != train_ds.fingerprint:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {resume_path}: it was trained on different data (dataset "
            f"fingerprint {resume_state.get('data_fingerprint')} != {train_ds.fingerprint})"
        )
    reference = _reference(cfg, ctx, mc, train_ds, tokenizer, progress)
    return Checked(cfg, ctx, split, label, mc, model_dir, initial, train_ds, eval_ds, resume_state,
                   resume_path, parallel, reference)  # fmt: skip


def begin(checked: Checked) -> None:
    """The run's first writes, once every check passed: ``--overwrite`` deletes
    the old run, ``options.json`` records this one."""
    cfg, ctx = checked.cfg, checked.ctx
    if ctx.is_main:
        if cfg.overwrite:
            rundir.clear_run(Path(cfg.out_dir))
        rundir.write_options(cfg)
    ctx.barrier()


def build(checked: Checked, progress: bool = True, reference_checkpoint: Path | None = None) -> Run:
    """The model (from the checkpoint resumed, the model directory or a fresh
    initialization; wrapped for the run's parallel mode) and the reference
    losses. ``reference_checkpoint``: the built-in reference's, once trained."""
    cfg, ctx, mc = checked.cfg, checked.ctx, checked.mc
    reference, desc = _reference_losses(checked, reference_checkpoint)
    parallel = checked.parallel
    # A model that FSDP or tensor parallelism splits is built on the meta device and
    # split there; each process then allocates its own shards and fills them from
    # the checkpoint resumed, the model directory or the fresh initialization.
    on_meta = splits_model(parallel, ctx)
    if on_meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(mc)
    elif checked.resume_state is not None:
        model = LlamaForCausalLM.from_pretrained(checked.resume_path).to(ctx.device)
    elif checked.initial is not None:
        model = checked.initial.to(ctx.device)
    else:
        model = build_model(mc, device=ctx.device, seed=cfg.seed)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())  # meta tensors have sizes too
    wrapped = parallelize(model, ctx, parallel, cfg.dtype,
                          reshard_after_forward=choose_reshard(cfg.fsdp_reshard, ctx, n_params))  # fmt: skip
    if on_meta:
        weights = checked.resume_path or checked.model_dir  # the checkpoint resumed first
        materialize(model, ctx.device, initial_parameters(mc, cfg.seed) if weights is None
                    else checkpoint_parameters(weights))  # fmt: skip
    modes = ([parallel] if ctx.dp_size > 1 else []) + ([f"tp {ctx.tp}"] if ctx.tp > 1 else [])
    where = (f"{ctx.world_size} processes ({', '.join(modes)}, {ctx.device.type})" if ctx.distributed
             else str(ctx.device))  # fmt: skip
    captured = (cfg.cuda_graphs and ctx.device.type == "cuda"
                and why_not_captured(ctx.world_size, cfg.select, cfg.backward_options()) is None)  # fmt: skip
    backward = _backward_label(cfg, mc, ctx.device, captured)
    train_ds, label = checked.train_ds, checked.label
    _say(progress, f"[{label}] model {cfg.model} ({n_params / 1e6:.2f}M parameters) on {where}; "
                   f"data: {len(train_ds)} rows x {cfg.seq_len} tokens ({_data_label(cfg, train_ds, checked.split)})"
                   + (f"; selection {cfg.select} ρ={cfg.ratio:g} ({cfg.granularity}), "
                      f"backward {backward}" if cfg.select != "none" else "; no selection")
                   + (f"; reference: {desc}" if desc else "")
                   + (f"; resuming from {checked.resume_path}" if checked.resume_path else ""))  # fmt: skip
    title = f"{cfg.model} · {cfg.select}" + (f" ρ={cfg.ratio:g} · {backward}" if cfg.select != "none" else "")
    return Run(wrapped, model, ctx, parallel, train_ds, checked.eval_ds, reference, desc,
               checked.resume_state, checked.resume_path, mc.to_hf_dict(), label, title,
               choose_grad_sync(cfg.fsdp_grad_sync, ctx, n_params, parallel))  # fmt: skip


def splits_model(parallel: str, ctx: DistContext) -> bool:
    """Whether FSDP or tensor parallelism splits the model: then no process holds
    it whole (it is built on the meta device and filled shard by shard)."""
    return parallel == "fsdp" or ctx.tp > 1


def _data_label(cfg: TrainConfig, ds, split: str) -> str:
    if cfg.data is None:
        return f"built-in corpus, {split} split"
    label = ", ".join(cfg.data)
    what = {"prompt-completion": "prompt/completion records: loss on the completions",
            "messages": "chat records: loss on the assistant turns"}.get(ds.data_format)  # fmt: skip
    if what:
        label += f"; {what}, {100 * (1 - ds.context_tokens / ds.n_tokens):.0f}% of tokens"
    return label


def _backward_label(cfg: TrainConfig, mc, device: torch.device, captured: bool) -> str:
    """``amplified``, ``exact``, ... and, where ``auto`` chooses, the path it takes
    for this run's micro-batches (``amplified (dense path)``; captured: CUDA
    graphs replay the steps, ``use_compact_path``)."""
    opts = cfg.backward_options()
    label = opts.describe()
    if opts.mode == "amplified" and opts.path == "auto":
        if captured:
            use_compact_path(opts)
        path = opts.choose_path(cfg.batch_size * cfg.seq_len, mc.layer_parameters(), device.type)
        label += f" ({path} path{', CUDA graphs' if captured else ''})"
    exact = ([f"every {cfg.exact_every} steps"] if cfg.exact_every else []) + (
        [f"the last {100 * cfg.exact_final:g}% of steps"] if cfg.exact_final else [])  # fmt: skip
    if exact:
        label += ", exact backward " + " and ".join(exact)
    return label


def _datasets(cfg: TrainConfig, tokenizer, split: str, progress: bool):
    from centrifuge.data import load_dataset

    records = dict(data_format=cfg.data_format, text_field=cfg.text_field,
                   prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)  # fmt: skip
    train_ds = load_dataset(cfg.data, tokenizer, cfg.seq_len, split=split, cache_dir=cfg.cache_dir,
                            seed=cfg.seed, **records)  # fmt: skip
    try:
        eval_ds = load_dataset(cfg.data, tokenizer, cfg.seq_len, split="eval",
                               cache_dir=cfg.cache_dir, seed=cfg.seed, **records)  # fmt: skip
    except ValueError as e:
        eval_ds = None
        _say(progress, f"note: no evaluation ({e})")
    return train_ds, eval_ds


def _reference(cfg: TrainConfig, ctx: DistContext, mc: ModelConfig, train_ds, tokenizer,
               progress: bool) -> Reference | None:  # fmt: skip
    """rho1's reference, checked (and read: scores, a model's weights); None
    for the other selections."""
    if cfg.select != "rho1":
        if cfg.reference or cfg.reference_scores:
            _say(progress, f"note: selection {cfg.select!r} uses no reference; it is ignored")
        return None
    if cfg.reference_scores:
        from centrifuge.scoring import load_reference_scores

        scores = load_reference_scores(cfg.reference_scores, train_ds)
        return Reference(f"precomputed scores {cfg.reference_scores}", scores=scores)
    if cfg.reference:
        ref_dir = _reference_dir(cfg.reference)
        check_model_fits(ModelConfig.from_pretrained(ref_dir), cfg, tokenizer, what="reference model")
        model = LlamaForCausalLM.from_pretrained(ref_dir).to(ctx.device).eval()
        return Reference(f"model {ref_dir}", model=model)
    if cfg.data is not None:
        raise ValueError(
            "selection 'rho1' needs a reference: pass --reference MODEL_DIR (a reference model) "
            "or --reference-scores PATH (from `centrifuge score`), or choose --select "
            "loss/random/none"
        )
    sub = builtin_reference_config(cfg)
    if not sub.resume:
        return Reference(builtin=check(sub, ctx, progress, split="clean", label="reference"))
    ckpt = ckpt_io.resolve(sub.out_dir)
    state = ckpt_io.load_trainer_state(ckpt)
    if state.get("step", 0) < sub.total_steps(ctx.dp_size):  # interrupted: continue it
        return Reference(builtin=check(sub, ctx, progress, split="clean", label="reference"))
    # Finished: used as it is, on any number of processes.
    diff = _option_diff(state.get("config", {}), sub)
    if state.get("model_config") != mc.to_hf_dict():
        diff.append("another model")
    if diff:
        raise ckpt_io.CheckpointError(
            f"the built-in reference {ckpt} does not belong to this run ({'; '.join(diff)}): "
            "start the run over with --overwrite, or choose another --out-dir"
        )
    return Reference(builtin=ckpt)


def builtin_reference_config(cfg: TrainConfig) -> TrainConfig:
    """Rho-1's recipe on the built-in corpus: the same model trained on clean
    text (the corpus' ``clean`` split) for ``reference_steps`` steps, in
    ``<out_dir>/reference``, once per run: continued where it stopped, and
    reused when finished. Its step has the run's micro-batches (grad_accum x
    processes), so it resumes wherever the run does."""
    out = Path(cfg.out_dir) / rundir.REFERENCE
    started = not cfg.overwrite and (out / ckpt_io.LATEST).is_file()
    return dataclasses.replace(
        cfg, select="none", ratio=1.0, reference=None, reference_scores=None, backward_extra=0.0,
        backward_extra_weight=None, exact_layers=0, exact_top=0, kv_projections=False,
        backward_ratio=None, exact_every=0, exact_final=0.0,
        steps=cfg.reference_steps, max_tokens=None,
        eval_interval=0, save_interval=0, out_dir=str(out), resume=started, overwrite=not started,
        warmup_steps=min(cfg.warmup_steps, cfg.reference_steps // 4),
    )  # fmt: skip


def _reference_losses(checked: Checked, builtin_checkpoint: Path | None):
    """(callable rows, batch -> [n, L] reference losses on the device, description),
    or (None, None) without a reference."""
    ref, cfg, device = checked.reference, checked.cfg, checked.ctx.device
    if ref is None:
        return None, None
    if ref.scores is not None:
        scores = ref.scores

        def from_scores(rows, batch):
            return torch.from_numpy(np.ascontiguousarray(scores[np.asarray(rows)])).to(device)

        return from_scores, ref.desc
    if ref.model is not None:
        return _on_the_fly(ref.model, cfg, device), ref.desc
    model = LlamaForCausalLM.from_pretrained(builtin_checkpoint).to(device).eval()
    return _on_the_fly(model, cfg, device), f"built-in, trained on the clean split ({builtin_checkpoint})"


def _reference_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reference model {path!r} does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / ckpt_io.LATEST).is_file():  # a training run directory
        return ckpt_io.resolve(p)
    raise ValueError(f"reference {path!r} is not a model directory (no config.json)")


def _on_the_fly(ref_model, cfg: TrainConfig, device):
    from centrifuge.scoring import reference_losses

    def losses(rows, batch):
        return reference_losses(ref_model, batch, device, precision=cfg.dtype).to(device)

    return losses
