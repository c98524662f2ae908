"""Files written whole or not at all: a temporary file in the same folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import tempfile


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (parent folders created); returns the path.
    A failed write removes the temporary file and raises; ``path`` is old or new, never
    half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
