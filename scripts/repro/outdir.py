"""The ``--out`` folder of a reproduction script: it records the command that wrote it
(``command.json``) and refuses results of a different command unless ``--force``."""
from __future__ import annotations

import json
import os
import shlex
from typing import Any
from collections.abc import Sequence

from utils.errors import UserError

COMMAND_FILE = "command.json"


class OutDirError(UserError, RuntimeError):
    """The --out folder holds results of another command."""


def claim(out: str, script: str, settings: dict[str, Any], argv: Sequence[str],
          force: bool) -> None:
    """Make ``out`` this command's folder. ``settings`` are the options that decide the
    results; a folder written with other settings (or by hand) needs ``force``."""
    path = os.path.join(out, COMMAND_FILE)
    record = {"script": script, "settings": settings,
              "command": shlex.join([f"scripts/{script}.sh", *argv])}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        same = old.get("script") == script and old.get("settings") == json.loads(
            json.dumps(settings))
        if not same and not force:
            raise OutDirError(
                f"--out {out} holds results of a different command ({old.get('command')}); "
                f"choose another --out, or pass --force to replace them")
    elif os.path.isdir(out) and os.listdir(out) and not force:
        raise OutDirError(f"--out {out} is not empty and has no {COMMAND_FILE} (not a results "
                          f"folder of these scripts); choose another --out, or pass --force")
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
