"""General English text that every machine has offline: the documentation that
ships with Python's standard library.

Used to pretrain a *base* model before continued training on the built-in
corpus (the setting of Rho-1 and the Centrifuge paper: a pretrained model,
further trained on noisy domain text). Two sources, both read from the
running interpreter's files without importing any of the modules (no side
effects, no network):

* the docstrings of every standard-library module, class and function, one
  document per module (parsed with :mod:`ast` from the ``.py`` sources; test
  suites, IDLE and demos left out);
* the language and library reference topics of ``pydoc_data.topics`` (what
  ``help("if")`` prints), one document per topic.

About 2.3 MB of text on CPython 3.11. The result is deterministic for a given
Python version (files in sorted order); :func:`fingerprint` names that version,
so results can say which text they were trained on.
"""

from __future__ import annotations

import ast
import functools
import platform
import sysconfig
from pathlib import Path

_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
                        "site-packages", "dist-packages", "__pycache__"})  # fmt: skip


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> tuple[str, ...]:
    """Docstring documents (one per stdlib module, docstrings separated by blank
    lines) followed by the pydoc topics, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            parts = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. lib2to3 test data
            continue
        if parts:
            docs.append("\n\n".join(parts))
    from pydoc_data.topics import topics

    docs.extend(topics[name].strip() for name in sorted(topics))
    return tuple(docs)


def fingerprint() -> str:
    """Which text :func:`stdlib_documents` returns: the Python implementation and version."""
    return f"{platform.python_implementation()} {platform.python_version()} stdlib docs"
