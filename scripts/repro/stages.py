"""Training stages of a from-scratch reproduction (paper Sec. 3.3-4; SPEC sections 4 and 7).

A :class:`StageRun` is one call of a training script (``pretrain_resnet.py``,
``cl_training.py``, ``finetune.py``) with a config from ``configs/`` and the flags that
place it in the reproduction's run folders. :func:`run_stage` runs it in this process
(its output goes to a log file) and never repeats or overwrites work silently:

* a stage whose final checkpoint exists is skipped;
* an interrupted stage (``last.t7`` but no final checkpoint) is continued with
  ``--resume``, and refused without it;
* ``--force`` moves the stage's folder aside (``<folder>.replaced-<time>``) and reruns it.

A failing stage raises :class:`StageError` naming the stage, its log and the command that
reruns it; later stages do not run.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import os
import re
import shlex
import time
import traceback
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

from utils.config import load_yaml
from utils.errors import UserError

LAST = "last.t7"
_EPOCH = re.compile(r"^(?:ckpt|pk)_E_(\d+)_")


class StageError(UserError, RuntimeError):
    """A stage failed, or cannot run without losing or silently reusing work."""


@dataclass
class StageRun:
    """One training-script call: ``python <script> <argv>`` writing into ``folder``."""

    name: str  # e.g. "finetune R110_C10 gamma=10"
    script: str  # "pretrain_resnet.py", "cl_training.py" or "finetune.py"
    argv: list[str]
    folder: str  # the run's --cv_dir
    final_epoch: int  # the epoch number in the final checkpoint's name (ckpt_E_<n> / pk_E_<n>)
    log: str  # log file of this stage
    options: dict[str, Any] = field(default_factory=dict)  # the resolved values we rely on

    def command(self, *extra: str) -> str:
        return shlex.join(["python", self.script, *self.argv, *extra])


def checkpoint_epoch(path: str) -> int | None:
    m = _EPOCH.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def newest_checkpoint(folder: str, prefix: str = "ckpt") -> str | None:
    """The checkpoint of the highest epoch in ``folder`` (``ckpt_E_*``/``pk_E_*``), or None."""
    found = [p for p in glob.glob(os.path.join(folder, f"{prefix}_E_*.t7"))
             if checkpoint_epoch(p) is not None]
    return max(found, key=lambda p: (checkpoint_epoch(p), p)) if found else None


def final_checkpoint(stage: StageRun) -> str | None:
    """The stage's final checkpoint when it exists (the stage is done), else None."""
    prefix = "pk" if stage.script == "pretrain_resnet.py" else "ckpt"
    path = newest_checkpoint(stage.folder, prefix)
    return path if path and checkpoint_epoch(path) == stage.final_epoch else None


def tested_every(final_epoch: int, wanted: int) -> int:
    """The largest test interval <= ``wanted`` that tests the final epoch (``e % n == 0``)."""
    if final_epoch == 0:
        return wanted
    return max(n for n in range(1, max(1, wanted) + 1) if final_epoch % n == 0)


def flags(options: dict[str, Any]) -> list[str]:
    """Command-line flags for ``options`` (True: a bare switch; lists: several values)."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def make_stage(name: str, script: str, config: str, overrides: dict[str, Any], log: str
               ) -> StageRun:
    """A stage from a YAML config and the flags that override it (given explicitly, they
    win over the YAML). Reads the config to know the stage's final epoch."""
    values = {**load_yaml(config), **overrides}
    if script == "pretrain_resnet.py":
        final = int(values["epochs"])  # pk_E_<epochs>
    else:
        final = int(values["max_epochs"])  # ckpt_E_<max_epochs>, a fresh run from epoch 0
        overrides = {**overrides,
                     "test_every": tested_every(final, int(values.get("test_every", 10)))}
        values["test_every"] = overrides["test_every"]
    argv = ["--config", config, *flags(overrides)]
    return StageRun(name, script, argv, values["cv_dir"], final, log, values)


def _move_aside(folder: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = f"{folder.rstrip(os.sep)}.replaced-{stamp}"
    os.replace(folder, target)
    return target


def call_script(script: str, argv: Sequence[str], log: str) -> str | None:
    """Run ``<script>.main(argv)`` in this process with its output appended to ``log``;
    returns None on success, else the error it ended with."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ {shlex.join(['python', script, *argv])}", flush=True)
        try:
            importlib.import_module(os.path.splitext(script)[0]).main(list(argv))
        except SystemExit as err:
            if err.code in (None, 0):
                return None
            if isinstance(err.code, str):
                print(err.code)
                return err.code
            message = f"exit status {err.code}"
        except Exception as err:  # a bug in the stage: keep the traceback in its log
            traceback.print_exc()
            return f"{type(err).__name__}: {err}"
        else:
            return None
    return f"{_last_line(log) or message}"


def _last_line(path: str) -> str:
    """The last non-empty line of a log (argparse's error line, for instance)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1] if lines else ""


def failure(what: str, error: str, log: str, command: str) -> str:
    """The one line that reports a failed stage or evaluation."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else "failed"
    return f"{what} failed: {last}. Log: {log}. Rerun it with: {command}"


def run_stage(stage: StageRun, *, resume: bool = False, force: bool = False,
              say=print) -> str:
    """Run ``stage`` unless it is done; returns its final checkpoint."""
    done = final_checkpoint(stage)
    if done and not force:
        say(f"[skip] {stage.name}: done ({done})")
        return done
    extra: list[str] = []
    if force and os.path.isdir(stage.folder):
        say(f"[force] {stage.name}: moved the old run to {_move_aside(stage.folder)}")
    elif os.path.isfile(os.path.join(stage.folder, LAST)):
        if not resume:
            raise StageError(
                f"stage '{stage.name}' was interrupted ({os.path.join(stage.folder, LAST)} "
                f"exists, no final checkpoint of epoch {stage.final_epoch}); rerun with "
                f"--resume to continue it, or --force to start it again")
        extra = ["--resume"]
    say(f"[run]  {stage.name} (log: {stage.log})")
    error = call_script(stage.script, stage.argv + extra, stage.log)
    final = final_checkpoint(stage)
    if error is None and final is None:
        error = f"finished without its final checkpoint (epoch {stage.final_epoch}) in " \
                f"{stage.folder}"
    if error is not None:
        again = ["--resume"] if os.path.isfile(os.path.join(stage.folder, LAST)) else []
        raise StageError(failure(f"stage '{stage.name}'", error, stage.log,
                                 stage.command(*again)))
    return final
