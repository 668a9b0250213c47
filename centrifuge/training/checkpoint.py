"""Training checkpoints, written atomically.

``<out_dir>/checkpoint-<step>/`` holds

    model.safetensors, config.json   the weights in Hugging Face layout
                                     (``LlamaForCausalLM.from_pretrained`` / transformers load it)
    tokenizer.json, tokenizer_config.json
                                     the run's tokenizer (``AutoTokenizer`` loads it; the
                                     built-in byte tokenizer too)
    trainer_state.pt                 optimizer, scheduler, step, RNG states, data position,
                                     counters and the run's configuration
    manifest.json                    size and sha256 of every file above (written last)

and ``<out_dir>/latest`` is a one-line file naming the newest complete one.
Every checkpoint is written into a temporary directory and renamed into place
only when complete, and ``latest`` is replaced with an atomic rename after
that, so a crash at any moment leaves ``latest`` naming a complete checkpoint.
Loading verifies the manifest, so a damaged checkpoint gives a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from centrifuge.io import fsync_path, write_text_atomic

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, step: int, model, trainer_state: dict,
                    tokenizer=None) -> Path:  # fmt: skip
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it.

    trainer_state: picklable by ``torch.save`` with ``weights_only`` loading
    (tensors, numbers, strings, lists, dicts).
    tokenizer: saved beside the weights (``tokenizer.save_pretrained``), its eos
    and pad ids written into config.json so that ``generate`` stops at eos."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            config = json.loads((tmp / "config.json").read_text())
            config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(dict(trainer_state, format_version=FORMAT_VERSION), tmp / STATE_FILE)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: dict(size=p.stat().st_size, sha256=_sha256(p)) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(dict(step=step, files=manifest), indent=1))
        for p in tmp.iterdir():
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_latest(out_dir: Path, name: str) -> None:
    write_text_atomic(out_dir / LATEST, name + "\n")


def clean_partial(out_dir: str | Path) -> list[Path]:
    """Remove temporary directories left by a crash in the middle of a save."""
    removed = []
    d = Path(out_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-", f".{LATEST}.")):
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
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a Centrifuge trainer state (version {FORMAT_VERSION})")
    return state
