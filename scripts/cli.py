"""What every ``python -m scripts.<tool>`` shares: one error path and checks of the flags.

:func:`guarded` runs a command's work: an expected failure (a ``UserError`` or an
operating-system error on a file: a missing folder, a read-only one, a full disk) prints one
line ``<command>: error: <what>`` and gives exit status 1, Ctrl-C prints
``<command>: interrupted`` and gives 130; bugs keep their traceback. The ``*_problem``
functions check flags before any work starts, so that nothing long runs and then fails on
a flag that could have been checked first.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from utils.launch import error_path

MAX_COUNT = 1 << 20  # larger image counts or batch sizes would not fit in memory


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``<prog>: error: <what>`` (status 2),
    without the usage block (``--help`` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def guarded(prog: str, work: Callable[[], object], debug: bool = False) -> int:
    """Run ``work``; 0 when it returns, 1 after one error line, 130 on Ctrl-C."""
    try:
        with error_path(prog, debug):
            work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            return 1
        return exit_.code or 0
    return 0


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _unwritable_folder(path: str) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes into, or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"{base} is a file, so no folder can be made under it"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable"
    return None


def folder_problem(flag: str, path: str) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes into, or None."""
    why = _unwritable_folder(path)
    return f"{flag} {path}: {why}" if why else None


def file_problem(flag: str, path: str) -> str | None:
    """Why this process cannot write the file ``path``, or None."""
    if os.path.isdir(path):
        return f"{flag} {path}: a folder of that name exists; expected a file name"
    why = _unwritable_folder(os.path.dirname(os.path.abspath(path)))
    return f"{flag} {path}: {why}" if why else None


def count_problem(flag: str, value: int | None, low: int = 1, high: int = MAX_COUNT
                  ) -> str | None:
    """Why an integer flag is out of ``[low, high]``, or None (None values are unset)."""
    if value is None or low <= value <= high:
        return None
    return f"{flag} must be in [{low}, {high}], got {value}"


def number_problem(flag: str, value: float | None, low: float = -math.inf) -> str | None:
    """Why a float flag is not a finite number of at least ``low``, or None."""
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{flag} must be a finite number, got {value}"
    if value < low:
        return f"{flag} must be at least {low:g}, got {value:g}"
    return None
