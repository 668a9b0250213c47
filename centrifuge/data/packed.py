"""PackedDataset: documents packed into fixed-length rows, read from the
memory-mapped token cache.

The token stream (every document followed by eos) is cut into rows of
``seq_len`` tokens. ``position_ids`` restart at 0 at every document start and
at every row start (a document cut by a row boundary continues as a new
document in the next row), so attention never crosses documents. The last row
is padded: padding gets ``labels = -100`` and positions restarting at 0, so it
forms its own segment that real tokens never attend to. Context tokens (a
fine-tuning example's prompt, a conversation's turns other than the assistant's)
are real tokens with ``labels = -100``: the model reads them, and the rows
predicting them carry no loss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedDataset:
    """Rows of a packed split. ``ds[i]`` / ``ds.batch(indices)`` give dicts of
    LongTensors ``input_ids``, ``labels``, ``position_ids`` ([seq_len] or
    [n, seq_len]); ``labels`` is the token id, or -100 on padding and context."""

    def __init__(self, folder: str | Path, seq_len: int, pad_id: int, identity: str = ""):
        self.folder = Path(folder)
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        meta = json.loads((self.folder / "meta.json").read_text())
        self.meta = meta
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.n_tokens = int(meta["n_tokens"])
        self.num_documents = int(meta["n_docs"])
        self.doc_starts = np.load(self.folder / "docs.npy")
        self.context = np.load(self.folder / "context.npy")  # [n_spans, 2] int64, [start, end)
        self.context_tokens = int(meta["n_context_tokens"])
        if self.n_tokens:
            self.tokens = np.memmap(self.folder / "tokens.bin", dtype=meta["dtype"], mode="r",
                                    shape=(self.n_tokens,))  # fmt: skip
        else:
            self.tokens = np.zeros(0, dtype=meta["dtype"])
        text = f"{meta['sha256']}|{meta['tokenizer']}|{identity}|seq_len={self.seq_len}"
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def cache_dir(self) -> Path:
        """The directory of this split's memory-mapped token cache."""
        return self.folder

    def __len__(self) -> int:
        return -(-self.n_tokens // self.seq_len)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a dataset of {n} rows")
        return {k: v[0] for k, v in self.batch([i % n]).items()}

    def batch(self, indices) -> dict:
        """indices: sequence of row indices -> dict of [n, seq_len] LongTensors."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        L, N = self.seq_len, self.n_tokens
        row_start = idx[:, None] * L
        j = row_start + np.arange(L)[None, :]  # [n, L] positions in the stream
        real = j < N
        jc = np.minimum(j, N - 1)
        ids = np.where(real, self.tokens[jc].astype(np.int64), self.pad_id)
        doc_start = self.doc_starts[np.searchsorted(self.doc_starts, jc, side="right") - 1]
        pos = np.where(real, j - np.maximum(doc_start, row_start), j - N)
        labels = np.where(real & ~self._in_context(jc), ids, IGNORE_INDEX)
        return dict(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels),
                    position_ids=torch.from_numpy(pos))  # fmt: skip

    def _in_context(self, j: np.ndarray) -> np.ndarray:
        """Which stream positions ``j`` lie in a context span (bool, j's shape)."""
        if not len(self.context):
            return np.zeros(j.shape, dtype=bool)
        k = np.searchsorted(self.context[:, 0], j, side="right") - 1  # the last span starting <= j
        return (k >= 0) & (j < self.context[np.maximum(k, 0), 1])

    def real_tokens(self, indices) -> int:
        """How many tokens of the given rows are not padding (only the last row has some)."""
        start = np.asarray(indices, dtype=np.int64).reshape(-1) * self.seq_len
        return int(np.clip(self.n_tokens - start, 0, self.seq_len).sum())

    def __repr__(self) -> str:
        return (f"PackedDataset({len(self)} rows x {self.seq_len}, {self.n_tokens} tokens, "
                f"{self.num_documents} documents, {self.folder})")  # fmt: skip
