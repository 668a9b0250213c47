"""A run's output directory: what a new command may do with it.

A directory that holds a run (a finished one, or one interrupted at any
point) is never overwritten by accident: a fresh run into it is refused unless
``overwrite`` is set, and ``resume`` continues it. ``options.json`` records the
options of the run's latest start, so that ``--resume`` continues with the
run's own options (even when it was interrupted before its first checkpoint)
and needs none of them on the command line. Only what a run wrote counts as a
run (its ``options.json``, checkpoints with their manifest, ...): a user's own
files are never deleted, and a new run does not start where it would write
into them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from centrifuge.io import write_text_atomic
from centrifuge.training import checkpoint as ckpt_io
from centrifuge.training.config import TrainConfig

OPTIONS = "options.json"
METRICS, PLOT, TENSORBOARD, REFERENCE = "metrics.jsonl", "loss_curves.png", "tensorboard", "reference"
# The names a run writes in its directory, besides checkpoint-<step>/ and the
# temporary directories of an interrupted save.
RUN_NAMES = (ckpt_io.LATEST, OPTIONS, METRICS, PLOT, TENSORBOARD, REFERENCE)
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_EVENTS = "events.out.tfevents."  # TensorBoard's event files
# Options a resumed run may change: budgets and bookkeeping, not what a step computes
# (grad_accum only with the number of processes, the product fixed: checked on resume).
MAY_CHANGE = ("steps", "max_tokens", "eval_interval", "eval_rows", "eval_problems",
              "save_interval", "device", "parallel", "grad_accum", "cache_dir", "out_dir",
              "resume", "overwrite")  # fmt: skip


def _our_options(path: Path) -> bool:
    """``path`` is an ``options.json`` that a run wrote (a JSON object of its options)."""
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(options, dict) and {"model", "select", "seq_len", "out_dir"} <= options.keys()


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and _CHECKPOINT.fullmatch(p.name) is not None and (p / ckpt_io.MANIFEST).is_file()


def is_run(out_dir: Path) -> bool:
    """``out_dir`` holds a run (finished or not): its ``options.json`` (written at
    the start), a checkpoint, or the run of its built-in reference."""
    if not out_dir.is_dir():
        return False
    return (_our_options(out_dir / OPTIONS) or any(_is_checkpoint(p) for p in out_dir.iterdir())
            or (out_dir.name != REFERENCE and is_run(out_dir / REFERENCE)))  # fmt: skip


def run_contents(out_dir: Path) -> list[Path]:
    """What the run in ``out_dir`` wrote (none: no run there). Files and folders
    that a run did not write are never part of it, whatever their names."""
    if not is_run(out_dir):
        return []
    found = []
    for p in out_dir.iterdir():
        if p.name == REFERENCE:
            ours = is_run(p)
        elif p.name == TENSORBOARD:
            ours = p.is_dir() and any(q.name.startswith(_EVENTS) for q in p.iterdir())
        elif p.name in RUN_NAMES:
            ours = p.is_file()
        else:
            ours = _is_checkpoint(p) or ckpt_io.PARTIAL.fullmatch(p.name) is not None
        if ours:
            found.append(p)
    return sorted(found)


def foreign_contents(out_dir: Path) -> list[Path]:
    """Files and folders under the names a run writes that no run wrote: a new
    run would write into them, so it may not start there."""
    if not out_dir.is_dir():
        return []
    ours = set(run_contents(out_dir))
    return sorted(p for p in out_dir.iterdir() if p not in ours
                  and (p.name in RUN_NAMES or _CHECKPOINT.fullmatch(p.name)))  # fmt: skip


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths)


def _describe(out_dir: Path) -> str:
    latest = out_dir / ckpt_io.LATEST
    if latest.is_file():
        return f"its latest checkpoint is {latest.read_text().strip()}"
    return "it was interrupted before its first checkpoint"


def check_fresh_start(cfg: TrainConfig) -> None:
    """Refuse to start a new run in a directory that holds one, unless
    ``cfg.overwrite``, or where a run would write into files no run wrote; a
    checkpoint of another directory may be continued only into an empty one
    (or its own)."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume is True:
        return
    foreign = foreign_contents(out_dir)
    if foreign:
        raise ValueError(
            f"{out_dir} holds {_names(foreign)}, which no Centrifuge run wrote but a run "
            "writes there: move them or choose another --out-dir (--overwrite deletes only "
            "what a run wrote)"
        )
    if cfg.overwrite or not is_run(out_dir):
        return
    if cfg.resume:
        source = Path(cfg.resume).resolve()
        if out_dir.resolve() in (source, source.parent):
            return
        raise ValueError(
            f"{out_dir} already holds another run ({_describe(out_dir)}); continuing "
            f"{cfg.resume} there would replace it: choose an empty --out-dir"
        )
    raise ValueError(
        f"{out_dir} already holds a run ({_describe(out_dir)}); continue it with --resume, "
        "start it over with --overwrite (deletes it), or choose another --out-dir"
    )


def clear_run(out_dir: Path) -> None:
    """Delete the run in ``out_dir`` (``--overwrite``): exactly the files it wrote
    (a checkpoint's are those its manifest lists); anything else stays, and so
    do the folders holding it."""
    for p in run_contents(out_dir):
        if p.is_file() or p.is_symlink():
            p.unlink()
        elif p.name == REFERENCE:
            clear_run(p)
            _remove_empty(p)
        elif p.name == TENSORBOARD:
            for q in p.iterdir():
                if q.name.startswith(_EVENTS) and q.is_file():
                    q.unlink()
            _remove_empty(p)
        elif ckpt_io.PARTIAL.fullmatch(p.name):
            shutil.rmtree(p)
        else:  # a checkpoint
            try:
                listed = list(json.loads((p / ckpt_io.MANIFEST).read_text())["files"])
            except (ValueError, KeyError, TypeError):  # a damaged manifest: still our checkpoint
                shutil.rmtree(p)
                continue
            for name in [*listed, ckpt_io.MANIFEST]:
                (p / name).unlink(missing_ok=True)
            _remove_empty(p)


def _remove_empty(d: Path) -> None:
    """Remove ``d`` and the folders below it that are (then) empty."""
    for sub in sorted((q for q in d.rglob("*") if q.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(d.iterdir()):
        d.rmdir()


def write_options(cfg: TrainConfig) -> None:
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    options = dict(cfg.to_dict(), resume=False, overwrite=False)
    write_text_atomic(Path(cfg.out_dir) / OPTIONS, json.dumps(options, indent=1) + "\n")


def read_options(out_dir: Path) -> dict | None:
    path = out_dir / OPTIONS
    if not path.is_file():
        return None
    try:
        options = json.loads(path.read_text())
    except ValueError as e:
        raise ckpt_io.CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(options, dict):
        raise ckpt_io.CheckpointError(f"{path} is corrupt: not a JSON object")
    return options


def stored_options(cfg_resume, out_dir: Path) -> dict:
    """The options of the run that ``resume`` continues: a given checkpoint's,
    else the run directory's ``options.json``, else its latest checkpoint's."""
    if cfg_resume is not True:
        ckpt = ckpt_io.resolve(cfg_resume)
    else:
        options = read_options(out_dir)
        if options is not None:
            return options
        if not (out_dir / ckpt_io.LATEST).is_file():
            raise ckpt_io.CheckpointError(f"nothing to resume: {out_dir} holds no run "
                                          f"(no {OPTIONS}, no '{ckpt_io.LATEST}')")  # fmt: skip
        ckpt = ckpt_io.resolve(out_dir)
    return dict(ckpt_io.load_trainer_state(ckpt).get("config", {}))


def resume_config(given: dict) -> TrainConfig:
    """The configuration of ``--resume``: the run's own options, with the
    options ``given`` on the command line (or in a --config file) that may
    change. Any other given option that differs from the run's is refused,
    all of them named."""
    out_dir = Path(given.get("out_dir", TrainConfig.out_dir))
    stored = stored_options(given["resume"], out_dir)
    defaults = TrainConfig().to_dict()  # options a checkpoint of an older version lacks
    known = {**defaults, **{k: v for k, v in stored.items() if k in defaults},
             "resume": False, "overwrite": False}  # fmt: skip
    cfg = TrainConfig.from_dict({**known, **given})  # values normalized (a path -> [path])
    conflicts = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (the run's: {known[k]!r})"
                 for k in sorted(given) if k not in MAY_CHANGE and getattr(cfg, k) != known[k]]  # fmt: skip
    if conflicts:
        raise ckpt_io.CheckpointError(
            f"cannot resume the run in {out_dir} with other options: {'; '.join(conflicts)}. "
            "Leave them out to continue with the run's own, or start a new run "
            "(another --out-dir, or --overwrite)"
        )
    return cfg
