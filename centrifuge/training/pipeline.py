"""A run from start to end: every check, then the first write, the built-in
reference model where the run needs one (a run of its own in
``<out_dir>/reference``, trained once and reused), and the training loop."""

from __future__ import annotations

import time
from pathlib import Path

from centrifuge.distributed import init_distributed
from centrifuge.training import setup
from centrifuge.training.config import TrainConfig
from centrifuge.training.loop import Trainer


def train(cfg: TrainConfig, progress: bool = True, callback=None) -> dict:
    """Run (or resume) training; return the summary.

    callback(step, record) is called after every optimizer step with that
    step's metrics (in every process); raising :class:`StopTraining` ends the
    run there (with a checkpoint, so ``resume`` continues it).
    Summary keys: steps, steps_trained, tokens_seen, tokens_kept, tokens_per_s,
    wall_s, final_train_loss, eval_loss, eval_accuracy, checkpoint, metrics, plot, ...
    """
    t_start = time.perf_counter()
    ctx = init_distributed(cfg.device, cfg.tp)
    shown = progress and ctx.is_main
    checked = setup.check(cfg, ctx, progress=shown)  # writes nothing
    setup.begin(checked)
    reference = checked.reference.builtin if checked.reference is not None else None
    if isinstance(reference, setup.Checked):  # to train (or to continue) first
        setup.begin(reference)
        reference = Path(_fit(reference, shown, None, time.perf_counter())["checkpoint"])
    return _fit(checked, shown, callback, t_start, reference)


def _fit(checked: setup.Checked, progress: bool, callback, t_start: float,
         reference: Path | None = None) -> dict:  # fmt: skip
    run = setup.build(checked, progress, reference)
    return Trainer(checked.cfg, run, progress, callback).fit(t_start)
