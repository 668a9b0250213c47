"""Reading documents from user data: plain text, JSONL, Parquet, Arrow files
and ``datasets.save_to_disk`` directories.

``.txt`` / ``.md`` / ``.text``  one document per file.
``.jsonl`` / ``.json``          one JSON object per line (or a ``.json`` array of objects);
                                the document is the text field.
``.parquet``                    the text column.
``.arrow``                      an Arrow IPC file or stream with a text column.
a ``save_to_disk`` directory    (``state.json`` with ``_data_files``, or a
                                ``dataset_dict.json`` with splits: the ``train`` split).
any other directory             every supported file under it, in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".text")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".parquet", ".arrow")


def resolve_files(paths: list[str | Path]) -> list[Path]:
    """Expand the given paths into the data files to read, in a fixed order.
    Raises FileNotFoundError for a missing path, ValueError for an unsupported file."""
    if not paths:
        raise ValueError("no data paths given")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"data path {str(raw)!r} does not exist")
        if p.is_dir():
            files.extend(_dir_files(p))
        elif p.suffix.lower() in SUFFIXES:
            files.append(p)
        else:
            raise ValueError(
                f"data file {str(raw)!r} has an unsupported type; supported: {', '.join(SUFFIXES)}, "
                "or a datasets.save_to_disk directory"
            )
    if not files:
        raise ValueError(f"no data files found in {[str(p) for p in paths]} (supported: {SUFFIXES})")
    return files


def _dir_files(d: Path) -> list[Path]:
    if (d / "dataset_dict.json").is_file():  # DatasetDict: take the train split
        splits = _json_object(d / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{d} is a DatasetDict without a 'train' split (splits: {splits})")
        return _dir_files(d / "train")
    if (d / "state.json").is_file():  # a datasets.save_to_disk Dataset
        state = _json_object(d / "state.json")
        return [d / f["filename"] for f in state.get("_data_files", [])]
    return sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)


def _json_object(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: a JSON object was expected")
    return obj


def iter_documents(file: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one data file, in order (empty ones included).
    A file its suffix's reader cannot read raises ValueError naming the file."""
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        import pyarrow as pa

        try:
            yield from (_parquet if suffix == ".parquet" else _arrow)(file, text_field)
        except pa.ArrowException as e:
            raise ValueError(f"{file}: not a readable {suffix[1:]} file ({e})") from None
    elif suffix in TEXT_SUFFIXES:
        yield file.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".json" and _starts_with(file, "["):
        yield from _json_array(file, text_field)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl(file, text_field)
    else:
        raise ValueError(f"unsupported data file {file}")


def _parquet(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    _check_column(pf.schema_arrow.names, text_field, file)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from _strings(batch.column(0).to_pylist(), file)


def _arrow(file: Path, text_field: str) -> Iterator[str]:
    for batch in _arrow_batches(file):
        _check_column(batch.schema.names, text_field, file)
        yield from _strings(batch.column(text_field).to_pylist(), file)


def _jsonl(file: Path, text_field: str) -> Iterator[str]:
    with open(file, "rb") as f:  # bytes, so that a decoding error names its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}:{n}: not UTF-8 text ({e.reason} at byte {e.start} "
                                 "of the line)") from None  # fmt: skip
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{file}:{n}: no {text_field!r} field (found {keys})")
            if not isinstance(obj[text_field], str):
                raise ValueError(f"{file}:{n}: field {text_field!r} is not a string")
            yield obj[text_field]


def _starts_with(file: Path, char: str) -> bool:
    with open(file, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith(char)


def _json_array(file: Path, text_field: str) -> Iterator[str]:
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{file}: a JSON array of objects was expected")
    for n, obj in enumerate(items):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"{file}: item {n} has no string {text_field!r} field")
        yield obj[text_field]


def _arrow_batches(file: Path):
    import pyarrow as pa

    try:  # datasets writes the streaming format; plain .arrow files use the file format
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(file)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _check_column(names, text_field: str, file: Path) -> None:
    if text_field not in names:
        raise ValueError(f"{file}: no {text_field!r} column (columns: {list(names)})")


def _strings(values, file: Path) -> Iterator[str]:
    for v in values:
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{file}: the text column holds {type(v).__name__}, not strings")
        yield v or ""
