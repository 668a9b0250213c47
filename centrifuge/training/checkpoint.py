"""Training checkpoints, written atomically.

``<out_dir>/checkpoint-<step>/`` holds

    model.safetensors, config.json   the weights in Hugging Face layout
                                     (``LlamaForCausalLM.from_pretrained`` / transformers load it)
    tokenizer.json, tokenizer_config.json
                                     the run's tokenizer (``AutoTokenizer`` loads it; the
                                     built-in byte tokenizer too)
    trainer_state.pt                 optimizer, scheduler, step, RNG states (one per process),
                                     data position, counters and the run's configuration
    dcp/                             FSDP runs only: the optimizer state, sharded, written by
                                     every process with torch.distributed.checkpoint (it
                                     loads on any number of processes)
    manifest.json                    size and sha256 of every file above (written last)

and ``<out_dir>/latest`` is a one-line file naming the newest complete one.
Every checkpoint is written into a temporary directory and renamed into place
only when complete, and ``latest`` is replaced with an atomic rename after
that, so a crash at any moment leaves ``latest`` naming a complete checkpoint.
Under torchrun every process writes its shards into the same temporary
directory, and rank 0 renames it and moves ``latest`` only after all of them
finished (the directory must be on a file system every process sees).
Loading verifies the manifest, so a damaged checkpoint gives a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from centrifuge.distributed import DistContext
from centrifuge.io import fsync_path, write_text_atomic

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
SHARDED_DIR = "dcp"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name; per-process RNG states
# What a save cut short leaves: its temporary checkpoint directory, the replaced one,
# and the temporary file of ``latest`` (io.write_text_atomic's name).
PARTIAL = re.compile(r"\.(tmp|old)-checkpoint-\d+-[0-9a-f]{8}|\.latest\.[0-9a-f]{8}\.tmp")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, step: int, model, trainer_state: dict, *,
                    ctx: DistContext | None = None, weights: dict | None = None,
                    sharded: dict | None = None, tokenizer=None) -> Path:  # fmt: skip
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it. Every
    process calls it.

    model: the native model (its ``save_pretrained`` writes rank 0's copy);
    weights: the full state dict to save (None: the model's own);
    trainer_state: rank 0's, picklable by ``torch.save`` with ``weights_only``
    loading (tensors, numbers, strings, lists, dicts);
    sharded: a torch.distributed.checkpoint state dict every process writes
    into ``dcp/``;
    tokenizer: saved beside the weights (``tokenizer.save_pretrained``), its eos
    and pad ids written into config.json so that ``generate`` stops at eos."""
    ctx = ctx or DistContext()
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".tmp-checkpoint-{step}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    tmp = ctx.broadcast(tmp)
    try:
        if sharded is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR))
        ctx.barrier()  # every process's shards are on disk
        if ctx.is_main:
            _finish(out_dir, tmp, final, step, model, weights, trainer_state, tokenizer)
    finally:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()  # no process moves on before ``latest`` names the new checkpoint
    return final


def _finish(out_dir: Path, tmp: Path, final: Path, step: int, model, weights, trainer_state,
            tokenizer) -> None:  # fmt: skip
    model.save_pretrained(tmp, state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(dict(trainer_state, format_version=FORMAT_VERSION), tmp / STATE_FILE)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {p.relative_to(tmp).as_posix(): dict(size=p.stat().st_size, sha256=_sha256(p))
                for p in files}  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(dict(step=step, files=manifest), indent=1))
    for p in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
        fsync_path(p)
    fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume)
        old = out_dir / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(out_dir)
    _write_latest(out_dir, final.name)


def _write_latest(out_dir: Path, name: str) -> None:
    write_text_atomic(out_dir / LATEST, name + "\n")


def clean_partial(out_dir: str | Path) -> list[Path]:
    """Remove temporary directories left by a crash in the middle of a save."""
    removed = []
    d = Path(out_dir)
    if d.is_dir():
        for p in d.iterdir():
            if PARTIAL.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its ``latest``)."""
    p = Path(path)
    if (p / MANIFEST).is_file() or (p / STATE_FILE).exists():
        return p
    latest = p / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        target = p / name
        if not target.is_dir():
            raise CheckpointError(f"{latest} names {name!r}, which does not exist")
        return target
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raise CheckpointError(
        f"{p} is neither a training checkpoint (no {MANIFEST}) nor a run directory (no {LATEST})"
    )


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest; return the manifest."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: no {MANIFEST}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt {MANIFEST}: {e}") from None
    for name in ("model.safetensors", "config.json", STATE_FILE):
        if name not in files:
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: its manifest lacks {name}")
    for name, info in files.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if p.stat().st_size != info["size"] or _sha256(p) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: {name} does not match its recorded checksum"
            )
    return manifest


def load_trainer_state(ckpt: Path) -> dict:
    """Verify ``ckpt`` and read its trainer state (on the CPU)."""
    verify(ckpt)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {ckpt / STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a Centrifuge trainer state of format "
                              f"{FORMAT_VERSION} (written by an older version?)")  # fmt: skip
    return state
