"""The on-disk reference-score store: every token's reference-model loss,
row-aligned with a packed dataset, so ``rho1`` training needs no reference
forward per step.

A store is a directory::

    PATH/scores.bin    raw little-endian float16 or float32 array [n_rows, seq_len]
                       (memory-mapped; entry [i, t] = reference loss of row t of
                       dataset row i, i.e. of predicting token t + 1; 0 where the
                       row has no label)
    PATH/header.json   format, version, dataset fingerprint, shape, dtype, the
                       reference model's identity, chunk size, rows done and a
                       CRC-32 of every completed chunk
    PATH/.lock         held (flock) by the one writer

Crash safety: rows are written in chunks of ``chunk_rows``. A chunk's bytes are
flushed to disk *before* the header that counts it is replaced (temp file,
fsync, rename), so the header never claims rows that are not on disk. An
interrupted run leaves a header with ``rows_done < n_rows``: the loader refuses
it as incomplete, and the writer resumes after the last completed chunk. The
per-chunk CRCs catch data overwritten or damaged after the fact.
"""

from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from centrifuge.io import write_text_atomic

FORMAT = "centrifuge-reference-scores"
VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
HEADER = "header.json"
DATA = "scores.bin"
LOCK = ".lock"


class ScoreStoreError(ValueError):
    """A score store that is missing, incomplete, corrupt or made for other data."""


def _crc(block: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B")) & 0xFFFFFFFF


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def read_header(path: str | Path) -> dict:
    """The store's header, checked for form. Raises ScoreStoreError."""
    path = Path(path)
    hp = path / HEADER
    if not path.is_dir():
        raise ScoreStoreError(f"no reference-score store at {path} (expected a directory)")
    if not hp.is_file():
        raise ScoreStoreError(
            f"{path} has no {HEADER}: not a reference-score store, or its first chunk "
            "was never completed"
        )
    try:
        h = json.loads(hp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoreStoreError(f"corrupt header {hp}: {e}") from e
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ScoreStoreError(f"{hp} is not a reference-score header (format != {FORMAT!r})")
    if h.get("version") != VERSION:
        raise ScoreStoreError(f"{hp} has format version {h.get('version')}, this reader knows {VERSION}")
    need = ("fingerprint", "n_rows", "seq_len", "dtype", "chunk_rows", "rows_done", "chunk_crc")
    missing = [k for k in need if k not in h]
    if missing:
        raise ScoreStoreError(f"corrupt header {hp}: missing {missing}")
    if h["dtype"] not in DTYPES:
        raise ScoreStoreError(f"corrupt header {hp}: unknown dtype {h['dtype']!r}")
    n, L, c, done = h["n_rows"], h["seq_len"], h["chunk_rows"], h["rows_done"]
    if not all(isinstance(v, int) and v >= 0 for v in (n, L, c, done)) or c == 0 or done > n:
        raise ScoreStoreError(f"corrupt header {hp}: bad sizes n_rows={n} seq_len={L} "
                              f"chunk_rows={c} rows_done={done}")
    if len(h["chunk_crc"]) != -(-done // c):
        raise ScoreStoreError(f"corrupt header {hp}: {len(h['chunk_crc'])} chunk checksums "
                              f"for {done} rows in chunks of {c}")
    return h


def _data_bytes(h: dict) -> int:
    return h["n_rows"] * h["seq_len"] * np.dtype(DTYPES[h["dtype"]]).itemsize


def _chunk_bounds(h: dict, j: int) -> tuple[int, int]:
    a = j * h["chunk_rows"]
    return a, min(a + h["chunk_rows"], h["n_rows"])


def _open_data(path: Path, h: dict, mode: str) -> np.memmap:
    dp = path / DATA
    if not dp.is_file():
        raise ScoreStoreError(f"{path} has no {DATA}")
    size = dp.stat().st_size
    if size != _data_bytes(h):
        raise ScoreStoreError(
            f"{dp} holds {size} bytes, the header's shape [{h['n_rows']}, {h['seq_len']}] "
            f"{h['dtype']} needs {_data_bytes(h)} (truncated or replaced)"
        )
    if h["n_rows"] * h["seq_len"] == 0:
        return np.zeros((h["n_rows"], h["seq_len"]), DTYPES[h["dtype"]])
    return np.memmap(dp, dtype=DTYPES[h["dtype"]], mode=mode, shape=(h["n_rows"], h["seq_len"]))


def verify(path: str | Path, h: dict | None = None) -> None:
    """Check every completed chunk against its CRC. Raises ScoreStoreError."""
    path = Path(path)
    h = h or read_header(path)
    data = _open_data(path, h, "r")
    for j, want in enumerate(h["chunk_crc"]):
        a, b = _chunk_bounds(h, j)
        if _crc(data[a:b]) != want:
            raise ScoreStoreError(
                f"{path / DATA}: rows {a}..{b - 1} fail their checksum (the file was modified "
                "or damaged after scoring); re-run `centrifuge score` with --overwrite"
            )


def dataset_shape(dataset) -> tuple[int, int]:
    """(rows, seq_len) of a PackedDataset-like object (``len``, ``batch``)."""
    seq_len = getattr(dataset, "seq_len", None)
    if seq_len is None:
        seq_len = int(dataset.batch([0])["input_ids"].shape[1]) if len(dataset) else 0
    return len(dataset), int(seq_len)


def check_matches(h: dict, dataset, where: str = "") -> None:
    """Raise ScoreStoreError unless the header was made for ``dataset``."""
    n, L = dataset_shape(dataset)
    if h["fingerprint"] != dataset.fingerprint:
        raise ScoreStoreError(
            f"reference scores{where} were computed for dataset {h['fingerprint']!r}, not for "
            f"this dataset {dataset.fingerprint!r} (other data, tokenizer, seq_len or built-in "
            "corpus seed): re-run `centrifuge score` with the training run's data options"
        )
    if (h["n_rows"], h["seq_len"]) != (n, L):
        raise ScoreStoreError(
            f"reference scores{where} have shape [{h['n_rows']}, {h['seq_len']}], the dataset "
            f"has [{n}, {L}]"
        )


def load_reference_scores(path: str | Path, dataset, verify_checksums: bool = True) -> np.ndarray:
    """The stored reference losses of ``dataset``, memory-mapped read-only.

    Returns a float32 memmap [len(dataset), seq_len] (the default store dtype);
    a store written with ``dtype="float16"`` comes back as its float16 memmap
    (half the disk; the Selector casts a batch to float32 itself). Raises ValueError
    (ScoreStoreError) when the store is missing, incomplete (an interrupted
    ``centrifuge score``), corrupt, or made for other data.
    """
    path = Path(path)
    h = read_header(path)
    where = f" at {path}"
    check_matches(h, dataset, where)
    if h["rows_done"] < h["n_rows"]:
        raise ScoreStoreError(
            f"reference scores{where} are incomplete: {h['rows_done']} of {h['n_rows']} rows "
            "scored (an interrupted run); run the same `centrifuge score` command again to resume"
        )
    if verify_checksums:
        verify(path, h)
    return _open_data(path, h, "r")


def score_path_for(dataset, model_tag: str) -> Path:
    """Default store location: beside the dataset's token cache."""
    base = getattr(dataset, "cache_dir", None)
    if base is None:
        raise ValueError("the dataset has no cache_dir; pass an explicit output path")
    return Path(base) / "reference_scores" / model_tag


@contextmanager
def _exclusive(path: Path):
    """One writer per store (POSIX advisory lock; a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ScoreStoreError(f"another process is writing the score store {path}") from None
        except OSError:  # a filesystem without locks (some network mounts): go on unlocked
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _same_model(a, b) -> bool:
    """Model identities from :func:`~centrifuge.scoring.score.model_identity` match
    by their weights' digest; where they were loaded from does not matter."""
    if isinstance(a, dict) and isinstance(b, dict) and "digest" in a and "digest" in b:
        return (a["digest"], a.get("numel")) == (b["digest"], b.get("numel"))
    return a == b


class ScoreWriter:
    """Writes a store chunk by chunk and resumes an interrupted one.

    ``with ScoreWriter.open(path, dataset, model_id) as w:``
    then, for ``a, b in w.pending_chunks()``: ``w.write_chunk(a, scores)`` with
    scores [b - a, seq_len] float. ``model_id`` (any JSON-able value) names the
    reference model; resuming with another model, dtype or chunk size is refused.
    """

    def __init__(self, path: Path, header: dict, data: np.memmap):
        self.path, self.header, self.data = path, header, data

    @classmethod
    @contextmanager
    def open(cls, path, dataset, model_id, dtype: str = "float32", chunk_rows: int = 1024,
             overwrite: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"score dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"the score store {path} is a file: give a directory")
        path.mkdir(parents=True, exist_ok=True)
        with _exclusive(path):
            n, L = dataset_shape(dataset)
            fresh = dict(format=FORMAT, version=VERSION, fingerprint=dataset.fingerprint,
                         n_rows=n, seq_len=L, dtype=dtype, model=model_id,
                         chunk_rows=int(chunk_rows), rows_done=0, chunk_crc=[])  # fmt: skip
            h = cls._resume_header(path, fresh, overwrite)
            if h is None:
                h = fresh
                # Header first (0 rows done), then the data file: a crash between the
                # two leaves a store that resumes from row 0.
                (path / DATA).unlink(missing_ok=True)
                _write_json_atomic(path / HEADER, h)
                with open(path / DATA, "wb") as f:
                    f.truncate(_data_bytes(h))  # sparse; filled chunk by chunk
            data = _open_data(path, h, "r+")
            w = cls(path, h, data)
            try:
                yield w
            finally:
                if isinstance(data, np.memmap):
                    data.flush()
                del w.data, data

    @staticmethod
    def _resume_header(path: Path, fresh: dict, overwrite: bool) -> dict | None:
        """The existing header if the store can be continued, None to start afresh."""
        if overwrite or not (path / HEADER).exists():
            return None
        old = read_header(path)
        if old["rows_done"] == 0:
            return None  # nothing worth keeping (perhaps not even the data file)
        same = {k: (old.get(k), fresh[k]) for k in
                ("fingerprint", "n_rows", "seq_len", "dtype", "model", "chunk_rows")}
        diff = {k: v for k, v in same.items() if v[0] != v[1]}
        if "model" in diff and _same_model(*diff["model"]):
            del diff["model"]
        if diff:
            detail = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ScoreStoreError(
                f"{path} already holds reference scores made differently ({detail}); "
                "pass overwrite=True (--overwrite) to replace them"
            )
        # Completed chunks must still be intact before new ones are appended.
        verify(path, old)
        return old

    @property
    def rows_done(self) -> int:
        return self.header["rows_done"]

    @property
    def complete(self) -> bool:
        return self.rows_done == self.header["n_rows"]

    def pending_chunks(self):
        """(start, stop) row ranges still to score, in order."""
        c, n = self.header["chunk_rows"], self.header["n_rows"]
        for a in range(self.rows_done, n, c):
            yield a, min(a + c, n)

    def write_chunk(self, start: int, scores) -> None:
        """Store rows [start, start + len(scores)) — exactly the next pending chunk."""
        h = self.header
        stop = min(start + h["chunk_rows"], h["n_rows"])
        if start != h["rows_done"]:
            raise ValueError(f"chunks must be written in order: next is row {h['rows_done']}, got {start}")
        arr = np.asarray(scores, dtype=np.float32)
        if arr.shape != (stop - start, h["seq_len"]):
            raise ValueError(f"chunk at row {start} must have shape {(stop - start, h['seq_len'])}, "
                             f"got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"reference losses of rows {start}..{stop - 1} are not finite")
        if arr.size and np.abs(arr).max() > np.finfo(DTYPES[h["dtype"]]).max:
            raise ValueError(f"reference losses of rows {start}..{stop - 1} overflow {h['dtype']}; "
                             "store them as float32")
        block = arr.astype(DTYPES[h["dtype"]])
        self.data[start:stop] = block
        if isinstance(self.data, np.memmap):
            self.data.flush()  # the bytes reach the disk before the header counts them
        h["chunk_crc"].append(_crc(block))
        h["rows_done"] = stop
        _write_json_atomic(self.path / HEADER, h)
