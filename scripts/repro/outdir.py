"""The ``--out`` folder of a reproduction command: it records the command that wrote it
(``command.json``) and refuses results of a different command unless ``--force``, which
moves them aside (``<out>.replaced-<time>``) before the new results are written."""
from __future__ import annotations

import json
import os
import shlex
from typing import Any
from collections.abc import Callable, Sequence

from scripts.repro.bookkeeping import BookkeepingError, move_aside, read_json, write_json
from utils.errors import UserError

COMMAND_FILE = "command.json"


class OutDirError(UserError, RuntimeError):
    """The --out folder holds results of another command."""


def _is_record(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("settings"), dict) and \
        isinstance(data.get("command"), str)


def read_record(out: str) -> dict[str, Any]:
    """The folder's ``command.json``; an unreadable one is refused in one line."""
    return read_json(os.path.join(out, COMMAND_FILE),
                     "pass --force to move the folder's results aside, or choose another "
                     "--out", _is_record)


def _other_command(out: str, script: str, settings: dict[str, Any]) -> str | None:
    """Why ``out`` holds another command's results (None: this command's, or empty)."""
    if os.path.isfile(os.path.join(out, COMMAND_FILE)):
        old = read_record(out)
        same = old.get("script") == script and old["settings"] == json.loads(
            json.dumps(settings))
        return None if same else f"holds results of a different command ({old['command']})"
    if os.path.isdir(out) and os.listdir(out):
        return (f"is not empty and has no {COMMAND_FILE} (not a results folder of these "
                f"scripts)")
    return None


def claim(out: str, script: str, settings: dict[str, Any], argv: Sequence[str],
          force: bool, say: Callable[[str], None] = print) -> None:
    """Make ``out`` this command's folder. ``settings`` are the options that decide the
    results; a folder written with other settings (or by hand) needs ``force``, and is
    then moved aside whole."""
    try:
        why = _other_command(out, script, settings)
    except BookkeepingError:
        if not force:
            raise
        why = f"has an unreadable {COMMAND_FILE}"
    if why and not force:
        raise OutDirError(f"--out {out} {why}; choose another --out, or pass --force to "
                          f"move them aside")
    if why:
        say(f"[force] --out {out} {why}: moved it to {move_aside(out)}")
    record = {"script": script, "settings": settings,
              "command": shlex.join([f"scripts/{script}.sh", *argv])}
    write_json(os.path.join(out, COMMAND_FILE), record)
