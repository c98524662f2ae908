"""The reproduction's own files (``command.json``, ``evals/*.json`` and their ``.cmd`` keys,
the benchmark's JSON): written atomically, read defensively.

A file is written to a temporary file in its own folder and renamed into place
(``os.replace``), so a reader sees the old file or the new one, never half of one. A cache
file that cannot be read, or holds the wrong shape, is treated as absent and recomputed
(:func:`read_cache`); any other file is refused in one line naming it and how to recover
(:func:`read_json`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any
from collections.abc import Callable

from utils.errors import UserError

from utils.files import write_text


class BookkeepingError(UserError, ValueError):
    """A file the reproduction wrote earlier cannot be read back."""


def write_json(path: str, data: Any) -> str:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fits(data: Any, valid: Callable[[Any], bool]) -> bool:
    try:
        return bool(valid(data))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return False


def read_cache(path: str, valid: Callable[[Any], bool] = lambda data: True) -> Any | None:
    """The JSON in ``path``, or None when it is missing, truncated, empty, not JSON or
    fails ``valid``: a cache that cannot be trusted is recomputed."""
    try:
        data = _load(path)
    except (OSError, ValueError):
        return None
    return data if _fits(data, valid) else None


def read_json(path: str, recover: str, valid: Callable[[Any], bool] = lambda data: True
              ) -> Any:
    """The JSON in ``path``; a file that is not readable JSON of the expected shape
    (``valid``) is refused in one line naming it and how to recover (``recover``)."""
    try:
        data = _load(path)
    except ValueError as err:
        raise BookkeepingError(f"{path} is not readable JSON ({err}); {recover}") from None
    if not _fits(data, valid):
        raise BookkeepingError(f"{path} does not hold what this tool writes there; {recover}")
    return data


def move_aside(folder: str) -> str:
    """Rename ``folder`` to ``<folder>.replaced-<UTC time>`` (``-2``, ``-3``... when that
    name is taken); returns the new name. Nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = f"{os.path.normpath(os.path.abspath(folder))}.replaced-{stamp}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.replace(folder, target)
    return target
