"""Durable writes: after a crash a reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file or a directory (which makes a rename inside it durable) to disk.
    Some filesystems refuse fsync on directories; then there is nothing more to do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def give_default_mode(path: str | Path) -> None:
    """Set ``path``'s permissions to those ``open()`` gives a new file (0666 less
    the umask): writers that go through a private temporary file (safetensors)
    leave 0600, unlike every other file of a checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
