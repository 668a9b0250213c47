"""``load_dataset``: from paths (or the built-in corpus) to a PackedDataset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from centrifuge.data import corpus
from centrifuge.data.cache import CACHE_VERSION, default_cache_dir, ensure_cache
from centrifuge.data.chat import ChatTemplate
from centrifuge.data.formats import RecordFormat, detect_format, iter_documents, resolve_files
from centrifuge.data.packed import PackedDataset
from centrifuge.data.tokenizer import load_tokenizer

# User data: every EVAL_EVERY-th document (in file order) is held out for eval.
EVAL_EVERY = 50
USER_SPLITS = ("train", "eval")


def load_dataset(paths: list[str] | None, tokenizer=None, seq_len: int = 256,
                 split: str = "train", cache_dir=None, seed: int = 0,
                 text_field: str = "text", data_format: str = "auto",
                 prompt_field: str = "prompt", completion_field: str = "completion") -> PackedDataset:  # fmt: skip
    """Tokenize (once, cached on disk) and pack documents into rows of ``seq_len``.

    paths:     data files/directories (text, JSONL, Parquet, Arrow, save_to_disk
               directories), or ``None`` for the built-in corpus generated from ``seed``.
    data_format, text_field, prompt_field, completion_field: how a record becomes a
               document (:class:`~centrifuge.data.formats.RecordFormat`): ``text``
               (the text field), ``prompt-completion`` (the prompt's tokens are
               context with labels -100, the completion's and the eos labelled),
               ``messages`` (a conversation rendered by the tokenizer's chat template,
               the assistant turns labelled), or ``auto``: by the first record's fields.
    tokenizer: a tokenizer object, a local HF tokenizer directory, or ``None``
               (the built-in byte tokenizer).
    split:     ``train`` or ``eval`` (held out: every 50th document of user data,
               clean problems of the built-in corpus, which also has ``clean``).
    cache_dir: root of the token cache (default ``$CENTRIFUGE_CACHE`` or
               ``~/.cache/centrifuge``).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if paths is None:
        if split not in corpus.SPLITS:
            raise ValueError(f"unknown split {split!r}; the built-in corpus has {corpus.SPLITS}")
        key = dict(version=CACHE_VERSION, source="builtin-corpus", corpus=corpus.VERSION,
                   seed=int(seed), split=split, tokenizer=tokenizer.identity)  # fmt: skip
        splits = (split,)

        def documents():
            return ((split, [(t, True)]) for t in corpus.documents(split, seed))
    else:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if split not in USER_SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {USER_SPLITS}")
        files = resolve_files(paths)
        fmt = detect_format(files, RecordFormat(data_format, text_field, prompt_field, completion_field))
        if fmt.kind == "messages":
            fmt = replace(fmt, chat=ChatTemplate.of(tokenizer))
        sources = []
        for f in files:
            st = f.stat()
            sources.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        key = dict(version=CACHE_VERSION, source="files", files=sources, format=fmt.cache_key(),
                   eval_every=EVAL_EVERY, tokenizer=tokenizer.identity)  # fmt: skip
        splits = USER_SPLITS

        def documents():
            i = 0
            for f in files:
                for doc in iter_documents(f, fmt):
                    yield ("eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"), doc
                    i += 1
    entry = ensure_cache(root, key, splits, documents, tokenizer)
    ds = PackedDataset(entry / split, seq_len, tokenizer.pad_id, tokenizer.identity)
    if ds.n_tokens == 0:
        where = "the built-in corpus" if paths is None else [str(p) for p in paths]
        if split == "eval" and paths is not None:
            raise ValueError(
                f"no held-out documents in {where}: every {EVAL_EVERY}th document is held out "
                f"for eval, so the data needs at least {EVAL_EVERY} non-empty documents"
            )
        raise ValueError(f"data {where} is empty after tokenization (split {split!r})")
    ds.tokenizer = tokenizer
    ds.split = split
    ds.data_format = "text" if paths is None else fmt.kind
    # The built-in held-out split carries its problems, for the answer-accuracy metric.
    ds.problems = corpus.heldout_problems(seed) if paths is None and split == "eval" else None
    return ds
