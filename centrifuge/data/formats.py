"""Reading documents from user data: plain text, JSONL, Parquet, Arrow files
and ``datasets.save_to_disk`` directories.

``.txt`` / ``.md`` / ``.text``  one document per file.
``.jsonl`` / ``.json``          one JSON object per line (or a ``.json`` array of objects).
``.parquet``                    a table, one record per row.
``.arrow``                      an Arrow IPC file or stream, one record per row.
a ``save_to_disk`` directory    (``state.json`` with ``_data_files``, or a
                                ``dataset_dict.json`` with splits: the ``train`` split).
any other directory             every supported file under it, in sorted order.

A record (JSON object, table row) is a document as :class:`RecordFormat` says:
its text field (pretraining), a prompt and a completion (supervised
fine-tuning: the prompt's tokens are context, read but never trained on), or
a conversation (``messages``: only the assistant turns are trained on).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from centrifuge.data.chat import ChatTemplate

TEXT_SUFFIXES = (".txt", ".md", ".text")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".parquet", ".arrow")
FORMATS = ("auto", "text", "prompt-completion", "messages")
MESSAGES_FIELD = "messages"

# A document: its text in segments, each with whether its tokens carry a loss
# (False: context, such as a prompt, that the model reads but is not trained to write).
Document = list[tuple[str, bool]]


@dataclass(frozen=True)
class RecordFormat:
    """How a record (a JSON object, a table row) becomes a :data:`Document`.

    kind: ``text``: the text field, every token labelled; ``prompt-completion``:
          the prompt field's text (context, no loss) then the completion field's
          (labelled); ``messages``: a list of {role, content} turns rendered by
          ``chat`` (a :class:`~centrifuge.data.chat.ChatTemplate`), the assistant
          turns labelled; ``auto``: decided by the data's first record (:meth:`decide`).
    detected_from: the record ``auto`` was decided by (for error messages).
    """

    kind: str = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    detected_from: str | None = field(default=None, compare=False)
    chat: ChatTemplate | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise ValueError(f"data format must be one of {FORMATS}, got {self.kind!r}")
        if self.prompt_field == self.completion_field:
            raise ValueError(f"the prompt and completion fields must differ, both are {self.prompt_field!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields every record of this (decided) format needs, in order."""
        if self.kind == "text":
            return (self.text_field,)
        if self.kind == "messages":
            return (MESSAGES_FIELD,)
        return (self.prompt_field, self.completion_field)

    def cache_key(self) -> dict:
        """What the tokens depend on (the token cache's key)."""
        key = dict(kind=self.kind, fields=list(self.fields))
        if self.kind == "messages":
            key["chat_template"] = self.chat.identity
        return key

    def decide(self, names: list[str], where: str, noun: str = "field") -> "RecordFormat":
        """The format of data whose first record has the fields (columns) ``names``:
        ``auto`` becomes ``prompt-completion`` where both of those fields are
        present, else ``messages`` where that field is, else ``text``."""
        if self.kind != "auto":
            return self
        pair = (self.prompt_field, self.completion_field)
        if all(f in names for f in pair):
            return replace(self, kind="prompt-completion", detected_from=where)
        if MESSAGES_FIELD in names:
            return replace(self, kind="messages", detected_from=where)
        if self.text_field in names:
            return replace(self, kind="text", detected_from=where)
        half = [f for f in pair if f in names]
        if half:
            other = pair[1 - pair.index(half[0])]
            raise ValueError(f"{where}: a {half[0]!r} {noun} without a {other!r} {noun}; "
                             "prompt/completion records need both")  # fmt: skip
        raise ValueError(_missing(where, self.text_field, noun, names)
                         + f"; records need a {self.text_field!r} {noun}, {pair[0]!r} and "
                         f"{pair[1]!r} {noun}s, or a {MESSAGES_FIELD!r} {noun} (--text-field, "
                         "--prompt-field and --completion-field name others)")  # fmt: skip

    def document(self, record, where: str) -> Document:
        """The document of one record; ``where`` names it in errors."""
        if self.kind == "auto":
            raise ValueError("the data format is not decided yet (detect_format)")
        for f in self.fields:
            if not isinstance(record, dict) or f not in record:
                found = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(_missing(where, f, "field", found) + self._origin())
        if self.kind == "text":
            text = record[self.text_field]
            return [(_string(text, self.text_field, where) if text is not None else "", True)]
        if self.kind == "messages":
            return self.chat.segments(_conversation(record[MESSAGES_FIELD], where), where)
        return [(_string(record[self.prompt_field], self.prompt_field, where), False),
                (_string(record[self.completion_field], self.completion_field, where), True)]  # fmt: skip

    def _origin(self) -> str:
        what = {"text": "text", "messages": "chat"}.get(self.kind, "prompt/completion")
        if self.detected_from is None:
            return f" (data format {self.kind!r})"
        return (f"; the data holds {what} records (detected from {self.detected_from}) and "
                "every record must have that form")  # fmt: skip


def _missing(where: str, name: str, noun: str, found) -> str:
    listed = f"columns: {list(found)}" if noun == "column" else f"found {found}"
    return f"{where}: no {name!r} {noun} ({listed})"


def _string(value, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} is not a string ({type(value).__name__})")
    return value


def _conversation(turns, where: str) -> list[dict]:
    """``turns`` checked: a non-empty list of {role, content} objects with string
    values (other keys pass to the template), with at least one assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field {MESSAGES_FIELD!r} is not a non-empty list of turns")
    for n, t in enumerate(turns):
        if not (isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("role", "content"))):
            raise ValueError(f"{where}: turn {n} of {MESSAGES_FIELD!r} is not a {{role, content}} "
                             f"object with string values ({t!r:.80})")  # fmt: skip
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError(f"{where}: no assistant turn in {MESSAGES_FIELD!r}: nothing to train on")
    return turns


TEXT = RecordFormat("text")


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


def detect_format(files: list[Path], fmt: RecordFormat) -> RecordFormat:
    """``fmt`` with its kind decided: ``auto`` looks at the first record (a
    table's columns) of the first file that has records; plain text files have none."""
    if fmt.kind != "auto":
        return fmt
    for file in files:
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            continue
        if suffix in (".parquet", ".arrow"):
            with _arrow_errors(file):
                names = _table_columns(file)
            if names is not None:
                return fmt.decide(names, str(file), "column")
            continue
        first = next(_json_records(file), None)
        if first is not None:
            where, record = first
            if not isinstance(record, dict):  # the text format's error names it when it is read
                return replace(fmt, kind="text")
            return fmt.decide(list(record), where)
    return replace(fmt, kind="text")


def iter_documents(file: Path, fmt: RecordFormat = TEXT) -> Iterator[Document]:
    """The documents of one data file, in order (empty ones included); ``fmt``
    is a decided format (:func:`detect_format`). A file its suffix's reader
    cannot read, or a record without the format's fields, raises ValueError
    naming the file (and the line or row)."""
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield [(file.read_text(encoding="utf-8", errors="replace"), True)]
    elif suffix in (".parquet", ".arrow"):
        with _arrow_errors(file):
            for where, record in (_parquet if suffix == ".parquet" else _arrow)(file, fmt.fields):
                yield fmt.document(record, where)
    elif suffix in (".jsonl", ".json"):
        for where, record in _json_records(file):
            yield fmt.document(record, where)
    else:
        raise ValueError(f"unsupported data file {file}")


@contextlib.contextmanager
def _arrow_errors(file: Path):
    import pyarrow as pa

    try:
        yield
    except pa.ArrowException as e:
        raise ValueError(f"{file}: not a readable {file.suffix.lower()[1:]} file ({e})") from None


def _table_columns(file: Path) -> list[str] | None:
    """The column names of a Parquet or Arrow file (None: an Arrow file without batches)."""
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(file).schema_arrow.names)
    batch = next(_arrow_batches(file), None)
    return None if batch is None else list(batch.schema.names)


def _parquet(file: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    _check_columns(pf.schema_arrow.names, columns, file)
    yield from _rows(pf.iter_batches(columns=list(columns), batch_size=1024), columns, file)


def _arrow(file: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    def checked():
        for batch in _arrow_batches(file):
            _check_columns(batch.schema.names, columns, file)
            yield batch

    yield from _rows(checked(), columns, file)


def _rows(batches, columns: tuple[str, ...], file: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every row of record batches, as dicts of ``columns``."""
    n = 0
    for batch in batches:
        values = [batch.column(c).to_pylist() for c in columns]
        for row in zip(*values):
            yield f"{file}: row {n}", dict(zip(columns, row))
            n += 1


def _json_records(file: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed value) for every record of a JSONL file or a JSON array."""
    if file.suffix.lower() == ".json" and _starts_with(file, "["):
        yield from _json_array(file)
        return
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
                yield f"{file}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not valid JSON ({e.msg})") from None


def _starts_with(file: Path, char: str) -> bool:
    with open(file, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith(char)


def _json_array(file: Path) -> Iterator[tuple[str, object]]:
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{file}: a JSON array of objects was expected")
    for n, obj in enumerate(items):
        yield f"{file}: item {n}", obj


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


def _check_columns(names, columns: tuple[str, ...], file: Path) -> None:
    for c in columns:
        if c not in names:
            raise ValueError(_missing(str(file), c, "column", names))
