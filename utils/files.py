"""Files written whole or not at all: a temporary file in the same folder, synced, then a
rename (and the folder synced, where the system allows, so that the rename lasts)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import IO


def replace_atomically(path: str, write: Callable[[IO[str]], None], prefix: str | None = None,
                       suffix: str = ".tmp") -> str:
    """Make ``path`` hold what ``write(f)`` writes to a text file ``f``, atomically (parent
    folders created); returns the path. The temporary file is named ``prefix`` (default
    ``.<name>.``) + random + ``suffix``. A failed write removes it and raises; ``path`` is
    old or new, never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}." if prefix is None else prefix,
                               suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where supported
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (:func:`replace_atomically`)."""
    return replace_atomically(path, lambda f: f.write(text))
