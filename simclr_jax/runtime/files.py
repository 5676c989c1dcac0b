"""Result files written whole or not at all: a crash never leaves a half-written one behind.

Each writer writes a temporary file in the target's folder, flushes and fsyncs it, then renames
it onto the target (`os.replace`, atomic on POSIX within one file system): a reader sees the old
file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any


def _fsync_folder(folder: str) -> None:
    """Makes the rename itself durable (a power cut after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) do not open folders
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` for a temporary path beside `path`, fsyncs it and renames it onto `path`.

    For writers that take a path (safetensors, orbax-free binary formats); text and JSON go
    through `write_text_atomic` / `write_json_atomic`.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    # Hidden, unique per writer, in the target's folder: the rename stays on one file system.
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` (UTF-8) through a fsynced temporary file and an atomic rename."""

    def write(tmp: str) -> None:
        with open(tmp, "x", encoding="utf-8") as f:  # honours the umask, unlike mkstemp's 0600
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> None:
    """Writes `json.dumps(obj, **json_kwargs)` to `path` atomically; a failed dump writes none."""
    text = json.dumps(obj, **json_kwargs)  # raises before any file is touched
    write_text_atomic(path, text)
