"""The on-disk token cache: documents tokenized once, stored as one flat
memory-mapped token stream per split, so a second run does not re-tokenize.

Layout of a cache entry ``<root>/<key>/<split>/``::

    tokens.bin   every document's tokens followed by eos, concatenated (uint16/uint32)
    docs.npy     int64 [n_docs + 1], where each document starts (last = n_tokens)
    context.npy  int64 [n_spans, 2], the [start, end) token ranges without a loss
                 (prompts, non-assistant chat turns), sorted and disjoint
    meta.json    n_tokens, n_docs, n_context_tokens, dtype, sha256 of the
                 content, tokenizer identity

An entry is written to a temporary directory and renamed into place when
complete, so an interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from centrifuge.data.formats import Document

CACHE_VERSION = 2  # 2: context.npy
_CHUNK = 256  # documents tokenized per batch


def default_cache_dir() -> Path:
    """``$CENTRIFUGE_CACHE`` or ``~/.cache/centrifuge``, plus ``/data``."""
    root = os.environ.get("CENTRIFUGE_CACHE") or Path.home() / ".cache" / "centrifuge"
    return Path(root) / "data"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def is_complete(entry: Path, splits: Iterable[str]) -> bool:
    try:
        for s in splits:
            meta = json.loads((entry / s / "meta.json").read_text())
            size = (entry / s / "tokens.bin").stat().st_size
            if size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def ensure_cache(root: Path, key: dict, splits: tuple[str, ...],
                 documents: Callable[[], Iterable[tuple[str, Document]]], tokenizer) -> Path:  # fmt: skip
    """Return the cache entry for ``key``, tokenizing ``documents()`` (pairs of
    split name and :data:`~centrifuge.data.formats.Document`) into it first if
    it is missing or incomplete."""
    root = Path(root)
    entry = root / key_digest(key)
    if is_complete(entry, splits):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, key, splits, documents, tokenizer)
        if entry.exists():  # incomplete leftovers, or another process finished first
            if is_complete(entry, splits):
                return entry
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry, splits):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


class _SplitWriter:
    def __init__(self, folder: Path, dtype):
        folder.mkdir(parents=True)
        self.folder, self.dtype = folder, dtype
        self.file = open(folder / "tokens.bin", "wb")
        self.starts = [0]
        self.context: list[list[int]] = []  # [start, end) spans without a loss
        self.hash = hashlib.sha256()

    def add(self, segments: list[tuple[list[int], bool]], eos: int) -> None:
        """One document: its segments' tokens (labelled or context), then eos (labelled)."""
        pos = self.starts[-1]
        ids: list[int] = []
        for seg, labelled in segments:
            a, b = pos + len(ids), pos + len(ids) + len(seg)
            if not labelled and a < b:
                if self.context and self.context[-1][1] == a:  # context turns in a row: one span
                    self.context[-1][1] = b
                else:
                    self.context.append([a, b])
            ids += seg
        arr = np.asarray(ids + [eos], dtype=self.dtype)
        data = arr.tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.starts.append(self.starts[-1] + len(arr))

    def close(self, key: dict, identity: str) -> None:
        self.file.close()
        starts = np.asarray(self.starts, dtype=np.int64)
        context = np.asarray(self.context, dtype=np.int64).reshape(-1, 2)
        np.save(self.folder / "docs.npy", starts)
        np.save(self.folder / "context.npy", context)
        self.hash.update(starts.tobytes())
        self.hash.update(context.tobytes())
        meta = dict(version=CACHE_VERSION, n_tokens=int(starts[-1]), n_docs=len(starts) - 1,
                    n_context_tokens=int((context[:, 1] - context[:, 0]).sum()),
                    dtype=np.dtype(self.dtype).name, sha256=self.hash.hexdigest(),
                    tokenizer=identity, key=key)  # fmt: skip
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _write(tmp: Path, key, splits, documents, tokenizer) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(tmp / s, dtype) for s in splits}
    pending: list[tuple[str, Document]] = []

    def flush():
        # One batch call for every segment of the pending documents.
        ids = iter(tokenizer.encode_batch([text for _, doc in pending for text, _ in doc]))
        for split, doc in pending:
            segments = [(next(ids), labelled) for _, labelled in doc]
            flat = [i for seg, _ in segments for i in seg]
            if flat:  # an empty document adds nothing, not even an eos
                if max(flat) >= tokenizer.vocab_size or min(flat) < 0:
                    raise ValueError(f"tokenizer produced an id outside [0, {tokenizer.vocab_size})")
                writers[split].add(segments, tokenizer.eos_id)
        pending.clear()

    for split, doc in documents():
        if split not in writers:
            raise ValueError(f"document assigned to unknown split {split!r}")
        pending.append((split, doc))
        if len(pending) >= _CHUNK:
            flush()
    flush()
    for w in writers.values():
        w.close(key, tokenizer.identity)
