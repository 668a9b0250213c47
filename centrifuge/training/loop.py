"""The training loop behind ``centrifuge train`` and :func:`train`.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` packed
rows. For each: a dense forward (every row's loss), the selection picks the
kept rows, ``plan.loss`` averages them and the backward runs on kept rows only
(``amplified``) or densely with a masked loss (``exact``). Data order, RNG
states, optimizer and scheduler are all restored on resume, so a resumed run
reproduces the uninterrupted one exactly (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from centrifuge.interrupt import DeferredStop
from centrifuge.training import checkpoint as ckpt_io
from centrifuge.training.config import TrainConfig
from centrifuge.training.metrics import MetricsLog, plot_losses, read_metrics
from centrifuge.training.schedule import WarmupCosine

# Options that must match between a checkpoint and the run resuming from it
# (anything that changes the data order, the updates or the model).
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "select", "ratio", "granularity",
               "backward", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
               "dtype", "seed", "reference", "reference_scores", "reference_steps")  # fmt: skip


class StopTraining(Exception):
    """Raised by a callback to end training early (after the current step)."""


class DataOrder:
    """Which dataset rows micro-batch ``m`` of step ``s`` reads: one seeded
    permutation of all rows per epoch, consumed in order. A pure function of
    (seed, step), so resuming needs only the step."""

    def __init__(self, n_rows: int, batch_size: int, grad_accum: int, seed: int):
        self.n, self.b, self.a, self.seed = n_rows, batch_size, grad_accum, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def rows(self, step: int, micro: int) -> np.ndarray:
        start = (step * self.a + micro) * self.b
        out = np.empty(self.b, dtype=np.int64)
        for i in range(self.b):
            k = start + i
            out[i] = self._perm(k // self.n)[k % self.n]
        return out

    def position(self, step: int) -> dict:
        rows = step * self.a * self.b
        return dict(rows_consumed=rows, epoch=rows // self.n, row_in_epoch=rows % self.n)


def _rng_state(selector) -> dict:
    st = dict(torch=torch.get_rng_state(), numpy=_np_state(), python=_py_state())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    gen = selector._generator
    if gen is not None:
        st["selector"] = gen.get_state()
    return st


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(st: dict, selector) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "selector" in st:
        selector._generator = torch.Generator().manual_seed(0)
        selector._generator.set_state(st["selector"])


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() lists a tied weight once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train(cfg: TrainConfig, progress: bool = True, callback=None, *, split: str = "train",
          label: str = "train") -> dict:
    """Run (or resume) training; return the summary.

    callback(step, record) is called after every optimizer step with that
    step's metrics; raising :class:`StopTraining` ends the run there (with a
    checkpoint, so ``resume`` continues it).
    Summary keys: steps, tokens_seen, tokens_kept, tokens_per_s, wall_s,
    final_train_loss, eval_loss, eval_accuracy, checkpoint, metrics, plot, ...
    """
    from centrifuge.training.setup import prepare

    t_start = time.perf_counter()
    run = prepare(cfg, progress=progress, split=split, label=label)
    return _loop(cfg, run, progress, callback, t_start)


def _log(progress: bool, msg: str) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(msg)


def _loop(cfg: TrainConfig, run, progress: bool, callback, t_start: float) -> dict:
    from tqdm import tqdm

    from centrifuge.evaluation import evaluate

    model, device, out_dir = run.model, run.device, Path(cfg.out_dir)
    total = cfg.total_steps
    order = DataOrder(len(run.train_ds), cfg.batch_size, cfg.grad_accum, cfg.seed)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, total, cfg.min_lr_ratio))
    selector = run.selector
    state = dict(step=0, tokens_seen=0, tokens_kept=0, valid_seen=0, train_time=0.0, recent=[])
    if run.resume_state is not None:
        rs = run.resume_state
        opt.load_state_dict(rs["optimizer"])
        sched.load_state_dict(rs["scheduler"])
        sched.lr_lambdas[0] = WarmupCosine(cfg.warmup_steps, total, cfg.min_lr_ratio)
        _set_rng_state(rs["rng"], selector)
        state.update({k: rs[k] for k in state})
    else:
        torch.manual_seed(cfg.seed)
    start = state["step"]
    ckpt_io.clean_partial(out_dir)  # temporary directories of a save cut short by a crash
    log = MetricsLog(out_dir, resume_step=start if run.resume_state is not None else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                else contextlib.nullcontext())  # fmt: skip

    def do_eval(step: int) -> dict | None:
        if run.eval_ds is None:
            return None
        with autocast:
            problems = getattr(run.eval_ds, "problems", None)
            r = evaluate(model, run.eval_ds, cfg.batch_size, device, max_rows=cfg.eval_rows,
                         problems=(problems or [])[: cfg.eval_problems] or [])
        log.log(dict(kind="eval", step=step, loss=r["loss"], perplexity=r["perplexity"],
                     accuracy=r["accuracy"]))  # fmt: skip
        acc = "" if r["accuracy"] is None else f", answer accuracy {100 * r['accuracy']:.1f}%"
        _log(progress, f"[{run.label}] step {step}: eval loss {r['loss']:.4f}{acc}")
        return r

    def trainer_state(step: int) -> dict:
        return dict(
            optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=_rng_state(selector),
            data=order.position(step), config=cfg.to_dict(), model_config=run.model_config_dict,
            data_fingerprint=run.train_ds.fingerprint, **dict(state, step=step),
        )  # fmt: skip

    def save(step: int) -> Path:
        return ckpt_io.save_checkpoint(out_dir, step, model, trainer_state(step),
                                       tokenizer=run.train_ds.tokenizer)  # fmt: skip

    last_eval = None
    if start >= total and start > 0:  # a finished run resumed: its last evaluation is logged
        last_eval = next((r for r in read_metrics(log.path)
                          if r.get("kind") == "eval" and r["step"] == start), None)  # fmt: skip
    if start == 0 or (start >= total and last_eval is None):
        last_eval = do_eval(start)
    saved_step = start if run.resume_state is not None else -1
    ckpt_path = run.resume_path
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
               desc=run.label)  # fmt: skip
    model.train()
    step = start
    stop = DeferredStop()  # Ctrl-C / SIGTERM end the run at the next step boundary
    try:
        while step < total:
            t0 = time.perf_counter()
            loss_sum = all_sum = 0.0
            seen = valid = kept = 0
            for micro in range(cfg.grad_accum):
                rows = order.rows(step, micro)
                b = {k: v.to(device) for k, v in run.train_ds.batch(rows).items()}
                with autocast:
                    out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                                backward=cfg.backward)  # fmt: skip
                ref = run.reference(rows, b) if selector.needs_reference else None
                keep = selector(out.token_loss, out.valid, ref)
                loss = out.plan.loss(out.token_loss, keep)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
                all_sum += float(out.token_loss.detach()[out.valid].mean())
                seen += int((b["labels"] != -100).sum())
                valid += int(out.valid.sum())
                kept += int(keep.sum())
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else _grad_norm(model))  # fmt: skip
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            state["train_time"] += dt
            state["tokens_seen"] += seen
            state["tokens_kept"] += kept
            state["valid_seen"] += valid
            train_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at step {step}; "
                                         "lower the learning rate or use fp32")  # fmt: skip
            state["recent"] = (state["recent"] + [train_loss])[-10:]
            record = dict(kind="train", step=step, loss=train_loss, loss_all=all_sum / cfg.grad_accum,
                          kept_fraction=kept / max(valid, 1), lr=lr, grad_norm=float(gnorm),
                          tokens_seen=state["tokens_seen"], tokens_kept=state["tokens_kept"],
                          tokens_per_s=seen / dt, step_s=dt)  # fmt: skip
            log.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", kept=f"{kept / max(valid, 1):.2f}",
                            tok_s=f"{state['tokens_seen'] / max(state['train_time'], 1e-9):.0f}")  # fmt: skip
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == total:
                last_eval = do_eval(step)
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == total:
                ckpt_path = save(step)
                saved_step = step
            if callback is not None:
                callback(step, record)
            stop.check()
    except StopTraining:  # a graceful stop: keep the steps done
        if step > saved_step and step > 0:
            ckpt_path = save(step)
    except KeyboardInterrupt:
        if step > saved_step and step > 0 and not stop.forced:  # keep the work done so far
            ckpt_path = save(step)
        _log(progress, f"[{run.label}] interrupted at step {step}; latest checkpoint: "
                       f"{ckpt_path or 'none yet'}")  # fmt: skip
        raise
    finally:
        stop.close()
        bar.close()
        log.close()
    plot = plot_losses(log.path, out_dir / "loss_curves.png", title=run.title)
    evals = [r for r in read_metrics(log.path) if r.get("kind") == "eval"]
    recent = state["recent"]
    return dict(
        steps=step,
        tokens_seen=state["tokens_seen"],
        tokens_kept=state["tokens_kept"],
        kept_fraction=state["tokens_kept"] / max(state["valid_seen"], 1),
        tokens_per_s=state["tokens_seen"] / state["train_time"] if state["train_time"] else 0.0,
        wall_s=time.perf_counter() - t_start,
        final_train_loss=sum(recent) / len(recent) if recent else None,
        eval_loss=None if last_eval is None else last_eval["loss"],
        eval_accuracy=None if last_eval is None else last_eval["accuracy"],
        checkpoint=None if ckpt_path is None else str(ckpt_path),
        metrics=str(log.path),
        plot=None if plot is None else str(plot),
        tensorboard=str(out_dir / "tensorboard") if log.tensorboard else None,
        out_dir=str(out_dir),
        reference=run.reference_desc,
        initial_eval_loss=evals[0]["loss"] if evals and evals[0]["step"] == 0 else None,
    )


def _grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
