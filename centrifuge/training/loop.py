"""The training loop behind ``centrifuge train`` and :func:`train`.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` packed rows
in each of the run's processes (one, or N under torchrun). For each: a dense
forward (every row's loss), the selection picks the kept rows, and the
backward runs on kept rows only (``amplified``) or densely with a masked loss
(``exact``). The step's loss is the sum of the kept rows' losses over all
micro-batches and processes divided by their total count; that count follows
from the labels before any forward runs (selection keeps ``ceil(ρ·n_valid)``),
so it is all-reduced once per step and no micro-batch waits for another. The
steps that ``exact_every`` / ``exact_final`` name run the exact backward: the
same model, given other backward options for those forwards.

Data order: step ``s`` reads micro-batches ``s·M … s·M + M − 1`` of one seeded
permutation per epoch (M = grad_accum × processes); process ``r`` takes
micro-batches ``m·N + r``. The random draws of a micro-batch (``random``
selection, the backward's sampled extra rows) come from generators seeded by
(seed, step, micro-batch) alone. N processes with ``grad_accum`` a therefore
train exactly what one process with ``grad_accum`` a·N trains, whatever the
selection, and a run resumes on another number of processes when
``grad_accum`` × processes stays the same. Optimizer, scheduler and counters
are restored on resume, so a resumed run reproduces the uninterrupted one
exactly (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)  # fmt: skip

from centrifuge.cuda_graphs import use_compact_path
from centrifuge.distributed import gradient_sync, reduce_replicated_grads, unsharded, uses_autocast
from centrifuge.interrupt import DeferredStop, Interrupted
from centrifuge.models.llama import shift_targets
from centrifuge.ops.linear_ce import IGNORE_INDEX
from centrifuge.plan import BackwardOptions, Layout, context_rows
from centrifuge.selection import Selector
from centrifuge.training import checkpoint as ckpt_io
from centrifuge.training.config import TrainConfig
from centrifuge.training.graphs import (
    CapturedMicroBatches, CapturedUpdate, why_not_captured, why_update_not_captured,
)  # fmt: skip
from centrifuge.training.metrics import MetricsLog, plot_losses, read_metrics
from centrifuge.training.schedule import ExactSchedule, WarmupCosine
from centrifuge.training.progress import Progress
from centrifuge.training.setup import Run


class StopTraining(Exception):
    """Raised by a callback to end training early (after the current step)."""


class DataOrder:
    """Which dataset rows micro-batch ``m`` of step ``s`` reads: one seeded
    permutation of all rows per epoch, consumed in order. A pure function of
    (seed, step), so resuming needs only the step.

    micro_per_step: micro-batches of the whole step (grad_accum × processes)."""

    def __init__(self, n_rows: int, batch_size: int, micro_per_step: int, seed: int):
        self.n, self.b, self.a, self.seed = n_rows, batch_size, micro_per_step, seed
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


def _rng_state() -> dict:
    st = dict(torch=torch.get_rng_state(), numpy=_np_state(), python=_py_state())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _optimizer(model, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only. fused: one kernel pass over the
    parameters instead of the foreach implementation's eight (used on one GPU;
    several processes keep foreach, the implementation their tests cover)."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() lists a tied weight once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def _row_kinds(batch: dict) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """([B, L] bool valid, [B, L] bool context rows, layout) of a (CPU) batch: the
    rows that carry a loss and the context rows (no label, before a labelled
    row), as the model's forward will find them, known before the forward runs;
    the document layout on the host."""
    B, L = batch["labels"].shape
    layout = Layout.build(B, L, "cpu", batch["position_ids"])
    valid = shift_targets(batch["labels"], layout) != IGNORE_INDEX
    return valid, context_rows(valid, layout), layout


class Trainer:
    """One run's optimizer, schedule, counters and steps (``fit`` runs them all)."""

    def __init__(self, cfg: TrainConfig, run: Run, progress: bool, callback=None):
        self.cfg, self.run, self.progress, self.callback = cfg, run, progress, callback
        self.stop: DeferredStop | None = None  # while fit runs
        self.stop_requested = False  # a process saw a signal during the last step
        self.out: Progress | None = None  # while fit runs
        self.ctx, self.model = run.ctx, run.model
        # Tensor-parallel ranks read the same micro-batches: the data is split
        # over the data-parallel replicas (dp_size, dp_rank) only.
        self.total = cfg.total_steps(self.ctx.dp_size)
        self.order = DataOrder(len(run.train_ds), cfg.batch_size,
                               cfg.grad_accum * self.ctx.dp_size, cfg.seed)  # fmt: skip
        self.opt = _optimizer(self.model, cfg, fused=run.device.type == "cuda" and not self.ctx.distributed)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(cfg.warmup_steps, self.total, cfg.min_lr_ratio))
        self.counters = dict(step=0, tokens_seen=0, tokens_kept=0, valid_seen=0, train_time=0.0,
                             recent=[])  # fmt: skip
        self._ahead: tuple | None = None  # (step, _host_batches(step)) prepared during the step before
        # The random draws of a micro-batch: the selection's (``random``) from
        # ``draws``, the backward's sampled rows from the options' generator, both
        # seeded for each micro-batch (``_seed_draws``).
        self.draws = torch.Generator()
        self.selector = Selector(cfg.select, cfg.ratio, cfg.granularity, seed=self.draws)
        self.backward = cfg.backward_options()
        self.exact_steps = ExactSchedule(cfg.exact_every, cfg.exact_final, self.total)
        self.exact_backward = BackwardOptions("exact")
        self.autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                         if uses_autocast(run.parallel, cfg.dtype) else contextlib.nullcontext())  # fmt: skip
        self.graphs: CapturedMicroBatches | None = None
        if cfg.cuda_graphs:
            if run.device.type != "cuda":
                raise ValueError(f"--cuda-graphs needs a CUDA device; this run is on {run.device}")
            why = why_not_captured(self.ctx.world_size, cfg.select, self.backward)
            if why is None:
                self.graphs = CapturedMicroBatches(self.model.parameters(), run.device)
                use_compact_path(self.backward)
            elif self.ctx.is_main:
                print(f"[{run.label}] --cuda-graphs: {why}; the steps run eagerly")
        if run.resume_state is not None:
            self.load_state(run.resume_state, run.resume_path)
        else:
            torch.manual_seed(cfg.seed)
        self.captured_update: CapturedUpdate | None = None
        if self.graphs is not None:  # after load_state: a resumed state brings its parameter groups
            why = why_update_not_captured(self.opt)
            if why is None:
                self.captured_update = CapturedUpdate(self.opt, self._update, run.device)
            elif self.ctx.is_main:
                print(f"[{run.label}] --cuda-graphs: {why}; the optimizer update runs eagerly")

    # --- state ---------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """The optimizer state lives in shards (FSDP): saved with DCP."""
        return self.run.parallel == "fsdp" or self.ctx.tp > 1

    def save(self, step: int) -> Path:
        """A checkpoint of the state after ``step`` steps (every process calls it)."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=full) if self.sharded else None
        state = dict(
            scheduler=self.sched.state_dict(), data=self.order.position(step),
            config=self.cfg.to_dict(), model_config=self.run.model_config_dict,
            data_fingerprint=self.run.train_ds.fingerprint, world_size=self.ctx.world_size,
            data_parallel=self.ctx.dp_size,
            rng=self.ctx.gather(_rng_state()),
            **dict(self.counters, step=step),
        )  # fmt: skip
        sharded = None
        if self.sharded:
            sharded = dict(optimizer=get_optimizer_state_dict(self.model, self.opt))
        else:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.opt, options=full)
        return ckpt_io.save_checkpoint(self.cfg.out_dir, step, self.run.module, state,
                                       ctx=self.ctx, weights=weights, sharded=sharded,
                                       tokenizer=self.run.train_ds.tokenizer)  # fmt: skip

    def load_state(self, rs: dict, path: Path) -> None:
        if "optimizer" in rs:
            set_optimizer_state_dict(self.model, self.opt, rs["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))  # fmt: skip
        else:
            import torch.distributed.checkpoint as dcp

            sharded = dict(optimizer=get_optimizer_state_dict(self.model, self.opt))
            dcp.load(sharded, checkpoint_id=str(path / ckpt_io.SHARDED_DIR),
                     no_dist=not self.ctx.distributed)  # fmt: skip
            set_optimizer_state_dict(self.model, self.opt, sharded["optimizer"])
        self.sched.load_state_dict(rs["scheduler"])
        # The saved schedule is the old run's (its total steps); a resumed run
        # follows its own budget, in every parameter group. The optimizer state
        # brought the old run's next lr: set this run's.
        schedule = WarmupCosine(self.cfg.warmup_steps, self.total, self.cfg.min_lr_ratio)
        self.sched.lr_lambdas = [schedule] * len(self.opt.param_groups)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * schedule(self.sched.last_epoch)
        # self.exact_steps follows self.total too: a run resumed with its own budget
        # runs the exact backward on the steps the uninterrupted run would.
        self.counters.update({k: rs[k] for k in self.counters})
        rngs = rs["rng"]
        if len(rngs) == self.ctx.world_size:
            _set_rng_state(rngs[self.ctx.rank])
        else:  # another number of processes (a step's own draws do not depend on them)
            torch.manual_seed(self.cfg.seed + rs["step"])

    # --- steps ---------------------------------------------------------------
    def _seed_draws(self, step: int, micro: int) -> None:
        """Seed the random draws of micro-batch ``micro`` (of the whole step, all
        processes) of ``step``: the same draws on any number of processes."""
        a, b = np.random.SeedSequence([self.cfg.seed, step, micro]).generate_state(2)
        self.draws.manual_seed(int(a))
        self.backward.generator.manual_seed(int(b))

    def _host_batches(self, step: int) -> tuple:
        """The host's part of ``step``, before any device work: (micro-batch indices,
        their rows, CPU batches, row kinds, kept counts, backward counts, exact?)."""
        cfg, ctx = self.cfg, self.ctx
        index = [m * ctx.dp_size + ctx.dp_rank for m in range(cfg.grad_accum)]
        micro = [self.order.rows(step, i) for i in index]
        batches = [self.run.train_ds.batch(rows) for rows in micro]
        kinds = [_row_kinds(b) for b in batches]
        counts = [self.selector.count(valid) for valid, _, _ in kinds]
        exact = self.exact_steps(step)
        rb = (self.exact_backward if exact else self.backward).backward_ratio
        # The rows ranked next (backward_ratio), counted on the host like the kept ones.
        backward_counts = [None if rb is None else self.selector.count(valid, rb) for valid, _, _ in kinds]
        return index, micro, batches, kinds, counts, backward_counts, exact

    def train_step(self, step: int) -> dict:
        """Forward and backward of every micro-batch of ``step``, then the update.
        Returns the step's metrics (summed over processes)."""
        cfg, ctx, run = self.cfg, self.ctx, self.run
        t0 = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        host = ahead[1] if ahead is not None and ahead[0] == step else self._host_batches(step)
        index, micro, batches, kinds, counts, backward_counts, exact = host
        backward = self.exact_backward if exact else self.backward
        # Σ kept over micro-batches and replicas; DDP/FSDP average gradients over
        # the N replicas, so each process scales its kept-loss sums by N / Σ. The
        # tensor-parallel ranks of a replica hold the same sums: one of them counts.
        counted = ctx.tp_rank == 0
        total = torch.tensor(sum(counts) * counted, dtype=torch.float64, device=run.device)
        scale = (ctx.dp_size / ctx.all_reduce_sum(total)).float()
        # kept loss, all loss, valid, kept; tokens seen (not padding: prompts count too)
        # and stop requests (a signal seen by any process stops every one after this
        # step: one all-reduce carries them all).
        sums = torch.zeros(6, dtype=torch.float64, device=run.device)
        for m, (rows, cpu, count, (_, context, layout), n_backward) in enumerate(
                zip(micro, batches, counts, kinds, backward_counts)):  # fmt: skip
            self._seed_draws(step, index[m])
            last = m == cfg.grad_accum - 1 or run.sync_every_micro_batch
            with gradient_sync(self.model, last=last):
                out = None
                if self.graphs is not None:
                    out = self._captured_micro_batch(rows, cpu, layout, context, count, n_backward,
                                                     backward, scale)  # fmt: skip
                if out is None:
                    b = {k: v.to(run.device, non_blocking=True) for k, v in cpu.items()}
                    ref = run.reference(rows, b) if self.selector.needs_reference else None
                    # CPU position ids: the model builds the document layout on the
                    # host, without waiting for the device (Layout.build).
                    loss, out = self._micro_batch(b["input_ids"], b["labels"],
                                                  dict(position_ids=cpu["position_ids"]), ref, context,
                                                  None, count, n_backward, backward, scale)  # fmt: skip
                    loss.backward()
            sums[:4] += out
        reduce_replicated_grads(run.module)
        lr = self.opt.param_groups[0]["lr"]
        gnorm = (self._update if self.captured_update is None else self.captured_update)()
        self.sched.step()
        sums[4] = sum(run.train_ds.real_tokens(rows) for rows in micro)
        if not counted:
            sums[:5] = 0
        # The next step's host work runs while the device finishes this one
        # (the read below is the step's one wait for the device).
        if step + 1 < self.total:
            self._ahead = (step + 1, self._host_batches(step + 1))
        sums[5] = self.stop is not None and self.stop.signum is not None
        loss_sum, all_sum, valid, kept, seen, stops = ctx.all_reduce_sum(sums).tolist()
        gnorm = float(gnorm)  # computed by now: no wait
        self.stop_requested = stops > 0
        dt = time.perf_counter() - t0
        loss = loss_sum / kept
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step + 1}; "
                                     "lower the learning rate or use fp32")  # fmt: skip
        c = self.counters
        c["train_time"] += dt
        c["tokens_seen"] += int(seen)
        c["tokens_kept"] += int(kept)
        c["valid_seen"] += int(valid)
        c["recent"] = (c["recent"] + [loss])[-10:]
        return dict(kind="train", step=step + 1, loss=loss, loss_all=all_sum / max(valid, 1),
                    kept_fraction=kept / max(valid, 1), lr=lr, grad_norm=gnorm,
                    tokens_seen=c["tokens_seen"], tokens_kept=c["tokens_kept"],
                    tokens_per_s=seen / dt, step_s=dt, exact_backward=int(exact))  # fmt: skip

    def _micro_batch(self, ids, labels, where: dict, ref, context, n_context, count, n_backward,
                     backward, scale) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A micro-batch's forward, selection and plan: (its kept-loss sum times
        ``scale``, to differentiate; [4] float64 kept-loss sum, all-loss sum, valid
        and kept rows). where: ``position_ids`` (CPU) or a prebuilt ``layout``;
        context: [B, L] bool context rows (n_context: their count, for a device
        mask); count, n_backward: the kept and backward rows, from the CPU labels."""
        with self.autocast:
            out = self.model(ids, labels=labels, backward=backward, **where)
        # The counts from the CPU labels let the selection and the plan run without
        # waiting for the device: the backward is queued behind the forward (the
        # device asserts that the keep mask holds `count` rows). A captured step
        # always passes them (a selection keeping every row then goes compact).
        host_count = count if self.selector.filters or "layout" in where else None
        keep, ranked = self.selector.select(out.token_loss, out.valid, ref, count=host_count,
                                            backward_ratio=backward.backward_ratio,
                                            backward_count=n_backward)  # fmt: skip
        out.plan.set_context(context, n_context)
        if ranked is not None:
            out.plan.set_ranked(ranked, n_backward - count)
        out.plan.set_keep(keep, host_count)
        if host_count is None and out.plan.n_keep != count:
            raise RuntimeError(f"selection kept {out.plan.n_keep} rows where {count} were "
                               "expected from the labels")  # fmt: skip
        kept_loss = (out.token_loss * keep).sum()
        tl = out.token_loss.detach().double()
        sums = torch.stack([kept_loss.detach().double(), (tl * out.valid).sum(),
                            out.valid.sum().double(), keep.sum().double()])  # fmt: skip
        return kept_loss * scale, sums

    def _captured_micro_batch(self, rows, cpu: dict, layout: Layout, context, count, n_backward,
                              backward, scale) -> torch.Tensor | None:  # fmt: skip
        """:meth:`_micro_batch` and its backward replayed from CUDA graphs: the
        [4] sums, or None where the batch is not captured (run it eagerly)."""
        graphs, run = self.graphs, self.run
        cap, static_layout = graphs.layout(layout)
        n_context = int(context.sum())
        b = graphs.update(input_ids=cpu["input_ids"], labels=cpu["labels"], context=context, scale=scale)
        ref = None
        if self.selector.needs_reference:  # computed eagerly (a store or another model), then copied
            ref = graphs.update(ref=run.reference(rows, dict(b, position_ids=static_layout.position_ids)))["ref"]
        signature = (count, n_context, n_backward, cap, id(backward))  # a run's options objects live on
        sums = graphs.run(signature, lambda: self._micro_batch(
            b["input_ids"], b["labels"], dict(layout=static_layout), ref, b["context"], n_context, count,
            n_backward, backward, b["scale"]))  # fmt: skip
        if graphs.note is not None:
            self.out.write(f"[{run.label}] {graphs.note}")
            graphs.note = None
        return None if sums is None else sums[1]

    def _update(self) -> torch.Tensor:
        """Clip the gradients, step the optimizer and zero the gradients; returns
        the norm of :meth:`_clip_grad`."""
        norm = self._clip_grad()
        self.opt.step()
        # Captured micro-batches accumulate into the gradient tensors they were captured with.
        self.opt.zero_grad(set_to_none=self.graphs is None)
        return norm

    def _clip_grad(self) -> torch.Tensor:
        """Clip the gradients in place; returns their total norm (a device scalar,
        read after the step's sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return norm

    def evaluate(self, step: int, log: MetricsLog | None) -> dict | None:
        """Held-out loss (and answer accuracy) of the model. Every process runs
        the same evaluation (FSDP needs them all for each forward); rank 0 logs."""
        from centrifuge.evaluation import evaluate

        run, cfg = self.run, self.cfg
        if run.eval_ds is None:
            return None
        problems = getattr(run.eval_ds, "problems", None)
        with self.autocast, unsharded(self.model):
            r = evaluate(run.module, run.eval_ds, cfg.batch_size, run.device,
                         max_rows=cfg.eval_rows, problems=(problems or [])[: cfg.eval_problems] or [])  # fmt: skip
        if log is not None:
            log.log(dict(kind="eval", step=step, loss=r["loss"], perplexity=r["perplexity"],
                         accuracy=r["accuracy"]))  # fmt: skip
        acc = "" if r["accuracy"] is None else f", answer accuracy {100 * r['accuracy']:.1f}%"
        self.out.write(f"[{run.label}] step {step}: eval loss {r['loss']:.4f}{acc}")
        return r

    # --- the run -------------------------------------------------------------
    def fit(self, t_start: float) -> dict:
        cfg, run, ctx = self.cfg, self.run, self.ctx
        out_dir, total = Path(cfg.out_dir), self.total
        start = self.counters["step"]
        resumed = run.resume_state is not None
        self.out = out = Progress(run.label, total, start, self.progress)
        log = None
        if ctx.is_main:
            ckpt_io.clean_partial(out_dir)  # temporary directories of a save cut short by a crash
            log = MetricsLog(out_dir, resume_step=start if resumed else None)
        last_eval = None
        if resumed and start >= total:  # a finished run resumed: its last evaluation is logged
            last_eval = ctx.broadcast(None if log is None else next(
                (r for r in read_metrics(log.path) if r.get("kind") == "eval" and r["step"] == start),
                None))  # fmt: skip
        if start == 0 or (start >= total and last_eval is None):
            last_eval = self.evaluate(start, log)
        saved_step = start if resumed else -1
        ckpt_path = run.resume_path
        self.model.train()
        step = start
        # Ctrl-C / SIGTERM end the run at a step boundary, with a checkpoint. Under
        # torchrun the processes see a signal at different moments: the request
        # travels with the step's all-reduce, so all of them stop after the same step.
        stop = self.stop = DeferredStop()
        try:
            while step < total:
                record = self.train_step(step)
                step += 1
                if log is not None:
                    log.log(record)
                c = self.counters
                out.step(step, record["loss"], record["kept_fraction"],
                         c["tokens_seen"] / max(c["train_time"], 1e-9))  # fmt: skip
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == total:
                    last_eval = self.evaluate(step, log)
                if (cfg.save_interval and step % cfg.save_interval == 0) or step == total:
                    ckpt_path, saved_step = self.save(step), step
                if self.callback is not None:
                    self.callback(step, record)
                if self.stop_requested or (stop.signum is not None and not ctx.distributed):
                    raise Interrupted(stop.signum or signal.SIGTERM)
        except StopTraining:  # a graceful stop: keep the steps done
            if step > saved_step and step > 0:
                ckpt_path = self.save(step)
        except KeyboardInterrupt as e:
            # Keep the work done so far. A second signal stops in the middle of a
            # step, whose state is not saved (under torchrun the other processes
            # are then ended by torchrun; the run continues from its last checkpoint).
            if step > saved_step and step > 0 and not stop.forced:
                ckpt_path = self.save(step)
            if isinstance(e, Interrupted):  # the caller says how to continue
                e.stopped_cleanly = not stop.forced
            out.write(f"[{run.label}] interrupted at step {step}; latest checkpoint: "
                      f"{ckpt_path or 'none yet'}")  # fmt: skip
            raise
        finally:
            stop.close()
            self.stop = None
            out.close()
            if log is not None:
                log.close()
        return self._summary(step, last_eval, ckpt_path, log, t_start)

    def _summary(self, step: int, last_eval, ckpt_path, log, t_start: float) -> dict:
        c, out_dir = self.counters, Path(self.cfg.out_dir)
        plot = evals = None
        if log is not None:
            plot = plot_losses(log.path, out_dir / "loss_curves.png", title=self.run.title)
            evals = [r for r in read_metrics(log.path) if r.get("kind") == "eval"]
        recent = c["recent"]
        return dict(
            steps=step,
            steps_trained=step - (self.run.resume_state or {}).get("step", 0),
            tokens_seen=c["tokens_seen"],
            tokens_kept=c["tokens_kept"],
            kept_fraction=c["tokens_kept"] / max(c["valid_seen"], 1),
            tokens_per_s=c["tokens_seen"] / c["train_time"] if c["train_time"] else 0.0,
            wall_s=time.perf_counter() - t_start,
            final_train_loss=sum(recent) / len(recent) if recent else None,
            eval_loss=None if last_eval is None else last_eval["loss"],
            eval_accuracy=None if last_eval is None else last_eval["accuracy"],
            checkpoint=None if ckpt_path is None else str(ckpt_path),
            metrics=str(out_dir / "metrics.jsonl"),
            plot=None if plot is None else str(plot),
            tensorboard=str(out_dir / "tensorboard") if log is not None and log.tensorboard else None,
            out_dir=str(out_dir),
            reference=self.run.reference_desc,
            initial_eval_loss=evals[0]["loss"] if evals and evals[0]["step"] == 0 else None,
            processes=self.ctx.world_size,
            parallel=self.run.parallel,
            tp=self.ctx.tp,
            cuda_graphs=None if self.graphs is None else dict(
                self.graphs.counts(),
                update_replayed=0 if self.captured_update is None else self.captured_update.replays),
        )
