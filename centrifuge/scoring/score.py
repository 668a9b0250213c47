"""The scoring pass: one no-grad forward of a reference model over a dataset,
every token's loss stored in a score store (see :mod:`centrifuge.scoring.store`)."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from centrifuge.scoring.store import ScoreWriter

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def model_identity(model, source: str | None = None) -> dict:
    """A small JSON-able identity of a model's weights, so that a resumed run
    refuses to mix scores of two different reference models. Hashes every
    tensor's name and shape and a strided sample of up to 4096 of its values
    (a full hash of a multi-GB checkpoint would cost more than it protects)."""
    h = hashlib.sha256()
    n = 0
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        n += flat.numel()
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.tobytes())
    return {"source": None if source is None else str(source), "numel": n,
            "digest": h.hexdigest()[:32]}  # fmt: skip


@torch.no_grad()
def reference_losses(model, batch: dict, device="cpu", precision: str = "fp32") -> torch.Tensor:
    """Every row's reference loss of one batch: [n, seq_len] float32 on the CPU,
    0 on rows without a label. ``batch`` holds input_ids, labels, position_ids
    ([n, seq_len] int64), as ``PackedDataset.batch`` returns them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    ids = batch["input_ids"].to(device)
    vocab = model.config.vocab_size
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(
            f"token ids span [{int(ids.min())}, {int(ids.max())}] but the reference model's "
            f"vocabulary has {vocab} entries: model and tokenizer do not match"
        )
    labels = batch["labels"].to(device)
    pos = batch.get("position_ids")
    pos = None if pos is None else pos.to(device)
    dt = PRECISIONS[precision]
    ctx = torch.autocast(torch.device(device).type, dtype=dt) if dt is not None else nullcontext()
    with ctx:
        out = model(ids, labels=labels, position_ids=pos)
    return out.token_loss.float().masked_fill(~out.valid, 0.0).cpu()


def _check_fits(model, dataset) -> None:
    cfg = model.config
    if dataset.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"rows of {dataset.seq_len} tokens are longer than the reference model "
                         f"supports (max_position_embeddings = {cfg.max_position_embeddings})")  # fmt: skip
    tokenizer = getattr(dataset, "tokenizer", None)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the reference "
                         f"model's vocabulary has only {cfg.vocab_size}: they do not match")  # fmt: skip


def default_chunk_rows(batch_size: int, target: int = 1024) -> int:
    """A commit interval: a whole number of batches, about ``target`` rows."""
    return max(batch_size, target // batch_size * batch_size)


def score_dataset(
    model,
    dataset,
    out: str | Path,
    batch_size: int = 8,
    device="cpu",
    precision: str = "fp32",
    dtype: str = "float32",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    model_source: str | None = None,
    progress=None,
    max_chunks: int | None = None,
) -> dict:
    """Score ``dataset`` with ``model`` into the store at ``out``; resumes an
    interrupted store made by the same model, dtype and chunk size.

    progress: a tqdm-like class (``progress(total=, initial=, unit=)``) or None.
    max_chunks: stop after this many chunks (for tests that simulate a crash).
    Returns dict(path, rows, rows_done, complete, resumed_from).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_fits(model, dataset)  # before the store is created: a misfit writes nothing
    chunk_rows = chunk_rows or default_chunk_rows(batch_size)
    model = model.to(device).eval()
    ident = model_identity(model, model_source)
    with ScoreWriter.open(out, dataset, ident, dtype=dtype, chunk_rows=chunk_rows,
                          overwrite=overwrite) as w:  # fmt: skip
        start = w.rows_done
        n = w.header["n_rows"]
        bar = progress(total=n, initial=start, unit="row", desc="scoring") if progress else None
        try:
            for j, (a, b) in enumerate(w.pending_chunks()):
                if max_chunks is not None and j >= max_chunks:
                    break
                parts = []
                for s in range(a, b, batch_size):
                    rows = list(range(s, min(s + batch_size, b)))
                    parts.append(reference_losses(model, dataset.batch(rows), device, precision))
                    if bar is not None:
                        bar.update(len(rows))
                w.write_chunk(a, torch.cat(parts).numpy().astype(np.float32))
        finally:
            if bar is not None:
                bar.close()
        return dict(path=str(out), rows=n, rows_done=w.rows_done, complete=w.complete,
                    resumed_from=start)  # fmt: skip
