"""Everything a run needs before its first step, checked up front: device,
checkpoint to resume, tokenizer, model, data, reference. Bad input fails
here with a clear message, before any training starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from centrifuge.device import resolve_device
from centrifuge.models import PRESETS, LlamaForCausalLM, ModelConfig, build_model, get_preset
from centrifuge.selection import Selector
from centrifuge.training import checkpoint as ckpt_io
from centrifuge.training import rundir
from centrifuge.training.config import TrainConfig


@dataclass
class Run:
    model: torch.nn.Module
    device: torch.device
    train_ds: object
    eval_ds: object | None
    selector: Selector
    reference: object  # (rows: np.ndarray, batch: dict) -> [n, L] float32 losses, or None
    reference_desc: str | None
    resume_state: dict | None
    resume_path: Path | None
    model_config_dict: dict
    label: str
    title: str


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def model_config(name: str) -> tuple[ModelConfig, Path | None]:
    """(config, directory or None for a preset)."""
    p = Path(name)
    if p.is_dir():
        return ModelConfig.from_pretrained(p), p
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


def _check_options(old: dict, cfg: TrainConfig, source: Path) -> None:
    from centrifuge.training.loop import RESUME_KEYS

    diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS
            if old.get(k) != getattr(cfg, k)]  # fmt: skip
    if diff:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {source}: the run's options differ from the checkpoint's "
            f"({'; '.join(diff)})"
        )


def _check_resume(state: dict, cfg: TrainConfig, mc: ModelConfig, ckpt: Path, progress: bool) -> None:
    old = state.get("config", {})
    _check_options(old, cfg, ckpt)
    if state.get("model_config") != mc.to_hf_dict():
        raise ckpt_io.CheckpointError(
            f"cannot resume from {ckpt}: it holds a different model than {cfg.model!r}"
        )
    if old.get("steps") != cfg.steps or old.get("max_tokens") != cfg.max_tokens:
        _say(progress, f"note: the step/token budget changed since {ckpt.name}: the learning-rate "
                       "schedule follows the new budget")  # fmt: skip


def prepare(cfg: TrainConfig, progress: bool = True, split: str = "train",
            label: str = "train") -> Run:  # fmt: skip
    from centrifuge.data import load_dataset

    cfg.validate()
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")

    rundir.check_fresh_start(cfg)

    # Resume: read and verify the checkpoint first, so a bad one fails fast.
    resume_state = resume_path = None
    if cfg.resume is True and not (out_dir / ckpt_io.LATEST).is_file():
        options = rundir.read_options(out_dir)  # interrupted before its first checkpoint
        if options is None:
            raise ckpt_io.CheckpointError(f"nothing to resume: {out_dir} holds no run "
                                          f"('{ckpt_io.LATEST}' is missing)")  # fmt: skip
        _check_options(options, cfg, out_dir / rundir.OPTIONS)
        _say(progress, f"note: {out_dir} has no checkpoint yet: the run starts again from step 0")
    elif cfg.resume:
        resume_path = ckpt_io.resolve(out_dir if cfg.resume is True else Path(cfg.resume))
        resume_state = ckpt_io.load_trainer_state(resume_path)

    mc, model_dir = model_config(cfg.model)
    tokenizer = pick_tokenizer(cfg, model_dir, progress)
    check_model_fits(mc, cfg, tokenizer)
    if resume_state is not None:
        _check_resume(resume_state, cfg, mc, resume_path, progress)

    train_ds = load_dataset(cfg.data, tokenizer, cfg.seq_len, split=split, cache_dir=cfg.cache_dir,
                            seed=cfg.seed, text_field=cfg.text_field)  # fmt: skip
    if resume_state is not None and resume_state.get("data_fingerprint") != train_ds.fingerprint:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {resume_path}: it was trained on different data (dataset "
            f"fingerprint {resume_state.get('data_fingerprint')} != {train_ds.fingerprint})"
        )
    try:
        eval_ds = load_dataset(cfg.data, tokenizer, cfg.seq_len, split="eval",
                               cache_dir=cfg.cache_dir, seed=cfg.seed, text_field=cfg.text_field)  # fmt: skip
    except ValueError as e:
        eval_ds = None
        _say(progress, f"note: no evaluation ({e})")

    selector = Selector(cfg.select, cfg.ratio, cfg.granularity, seed=cfg.seed)
    if cfg.select == "random":  # created here so its state can be checkpointed from step 0
        selector._generator = torch.Generator().manual_seed(cfg.seed)
    # Every check passed: only now may an old run go (--overwrite) and this one begin.
    if cfg.overwrite:
        rundir.clear_run(out_dir)
    rundir.write_options(cfg)
    reference, desc = _reference(cfg, train_ds, tokenizer, device, progress)

    if resume_state is not None:
        model = LlamaForCausalLM.from_pretrained(resume_path).to(device)
    elif model_dir is not None:
        model = LlamaForCausalLM.from_pretrained(model_dir).to(device)
    else:
        model = build_model(mc, device=device, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    _say(progress, f"[{label}] model {cfg.model} ({n_params / 1e6:.2f}M parameters) on {device}; "
                   f"data: {len(train_ds)} rows x {cfg.seq_len} tokens "
                   f"({'built-in corpus, ' + split + ' split' if cfg.data is None else ', '.join(cfg.data)})"
                   + (f"; selection {cfg.select} ρ={cfg.ratio:g} ({cfg.granularity}), "
                      f"backward {cfg.backward}" if cfg.select != "none" else "; no selection")
                   + (f"; reference: {desc}" if desc else "")
                   + (f"; resuming from {resume_path}" if resume_path else ""))  # fmt: skip
    title = f"{cfg.model} · {cfg.select}" + (
        f" ρ={cfg.ratio:g} · {cfg.backward}" if cfg.select != "none" else "")  # fmt: skip
    return Run(model, device, train_ds, eval_ds, selector, reference, desc, resume_state,
               resume_path, mc.to_hf_dict(), label, title)  # fmt: skip


def _reference(cfg: TrainConfig, train_ds, tokenizer, device, progress: bool):
    """(callable rows, batch -> reference losses, description) for rho1, else (None, None)."""
    if cfg.select != "rho1":
        if cfg.reference or cfg.reference_scores:
            _say(progress, f"note: selection {cfg.select!r} uses no reference; it is ignored")
        return None, None
    if cfg.reference_scores:
        from centrifuge.scoring import load_reference_scores

        scores = load_reference_scores(cfg.reference_scores, train_ds)

        def from_scores(rows, batch):
            return torch.from_numpy(np.ascontiguousarray(scores[np.asarray(rows)])).to(device)

        return from_scores, f"precomputed scores {cfg.reference_scores}"
    if cfg.reference:
        ref_dir = _reference_dir(cfg.reference)
        mc = ModelConfig.from_pretrained(ref_dir)
        check_model_fits(mc, cfg, tokenizer, what="reference model")
        ref_model = LlamaForCausalLM.from_pretrained(ref_dir).to(device).eval()
        return _on_the_fly(ref_model, cfg, device), f"model {ref_dir}"
    if cfg.data is not None:
        raise ValueError(
            "selection 'rho1' needs a reference: pass --reference MODEL_DIR (a reference model) "
            "or --reference-scores PATH (from `centrifuge score`), or choose --select "
            "loss/random/none"
        )
    ref_dir = train_builtin_reference(cfg, progress)
    ref_model = LlamaForCausalLM.from_pretrained(ref_dir).to(device).eval()
    return _on_the_fly(ref_model, cfg, device), f"built-in, trained on the clean split ({ref_dir})"


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


def train_builtin_reference(cfg: TrainConfig, progress: bool) -> Path:
    """Rho-1's recipe on the built-in corpus: train the same model on clean
    text (the corpus' ``clean`` split) for ``reference_steps`` steps, once per
    output directory (continued where it stopped, and reused, on resume)."""
    from centrifuge.training.loop import train

    out = Path(cfg.out_dir) / "reference"
    started = (out / ckpt_io.LATEST).is_file()  # finished, or interrupted: continue it
    sub = dataclasses.replace(
        cfg, select="none", ratio=1.0, reference=None, reference_scores=None, grad_accum=1,
        steps=cfg.reference_steps, max_tokens=None, eval_interval=0, save_interval=0,
        out_dir=str(out), resume=started, overwrite=not started,
        warmup_steps=min(cfg.warmup_steps, cfg.reference_steps // 4),
    )  # fmt: skip
    try:
        summary = train(sub, progress=progress, split="clean", label="reference")
    except ckpt_io.CheckpointError:
        # A reference left by a run with other options or data: train a fresh one.
        sub = dataclasses.replace(sub, resume=False, overwrite=True)
        summary = train(sub, progress=progress, split="clean", label="reference")
    return Path(summary["checkpoint"])
