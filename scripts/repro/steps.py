"""Training steps of a from-scratch reproduction (paper Sec. 3.3-4; docs/reproducing.md).

A :class:`Step` is one call of a training script (``pretrain_resnet.py``,
``cl_training.py``, ``finetune.py``) with a config from ``configs/`` and the flags that
place it in the reproduction's run folders. :func:`run_step` runs it in a child process
(its output goes to a log file) and never repeats or overwrites work silently:

* a step whose final checkpoint exists is skipped;
* an interrupted step (``last.t7``, or a ``ckpt_E_*``/``pk_E_*`` of an earlier epoch,
  but no final checkpoint) is continued with ``--resume``, and refused without it;
* ``--force`` moves the step's folder aside (``<folder>.replaced-<time>``) and reruns it.

A failing step raises :class:`StepError` naming the step, its log and the command that
reruns it (a step killed by a signal says which); later steps do not run.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import torch

from scripts.repro.bookkeeping import move_aside
from utils.config import load_yaml
from utils.errors import UserError
from utils.run_folder import LAST, newest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EPOCH = re.compile(r"^(?:ckpt|pk)_E_(\d+)_")


class StepError(UserError, RuntimeError):
    """A step failed, or cannot run without losing or silently reusing work."""


@dataclass
class Step:
    """One training-script call: ``python <script> <argv>`` writing into ``folder``."""

    name: str  # e.g. "finetune R110_C10 gamma=10"
    script: str  # "pretrain_resnet.py", "cl_training.py" or "finetune.py"
    argv: list[str]
    folder: str  # the run's --cv_dir
    final_epoch: int  # the epoch number in the final checkpoint's name (ckpt_E_<n> / pk_E_<n>)
    log: str  # log file of this step
    options: dict[str, Any] = field(default_factory=dict)  # the resolved values we rely on

    def command(self, *extra: str) -> str:
        """The shell command that runs this step from the current folder."""
        return shlex.join([sys.executable, shown_path(self.script), *self.argv, *extra])


def script_path(script: str) -> str:
    """A script named relative to the repository root (``finetune.py``), as a path."""
    return script if os.path.isabs(script) else os.path.join(ROOT, script)


def shown_path(script: str) -> str:
    """The script's path as the current folder reaches it (relative when under it)."""
    rel = os.path.relpath(script_path(script))
    return script_path(script) if rel.startswith(os.pardir) else rel


def checkpoint_epoch(path: str) -> int | None:
    m = _EPOCH.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def newest_path(folder: str, prefix: str = "ckpt") -> str | None:
    """The path of :func:`utils.run_folder.newest_checkpoint` (``ckpt_E_*`` by default)."""
    newest = newest_checkpoint(folder, prefix)
    return newest[0] if newest else None


def final_checkpoint(step: Step) -> str | None:
    """The step's final checkpoint when it exists (the step is done), else None."""
    prefix = "pk" if step.script == "pretrain_resnet.py" else "ckpt"
    path = newest_path(step.folder, prefix)
    return path if path and checkpoint_epoch(path) == step.final_epoch else None


def tested_every(final_epoch: int, wanted: int) -> int:
    """The largest test interval <= ``wanted`` that tests the final epoch (``e % n == 0``)."""
    if final_epoch == 0:
        return wanted
    return max(n for n in range(1, max(1, wanted) + 1) if final_epoch % n == 0)


def flags(options: dict[str, Any]) -> list[str]:
    """Command-line flags for ``options`` (True: a bare switch; lists: several values).
    A single value is one ``--key=value`` token, so that negative numbers and exponents
    (``--penalty=-1e-05``) reach argparse as values, not as options."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        else:
            out.append(f"--{key}={value}")
    return out


def make_step(name: str, script: str, config: str, overrides: dict[str, Any], log: str
              ) -> Step:
    """A step from a YAML config and the flags that override it (given explicitly, they
    win over the YAML). Reads the config to know the step's final epoch."""
    values = {**load_yaml(config), **overrides}
    if script == "pretrain_resnet.py":
        final = int(values["epochs"])  # pk_E_<epochs>
    else:
        # ckpt_E_<max_epochs> of a fresh run; --load continues the loaded epoch count for
        # max_epochs + 1 more epochs (the authors' finetune.py)
        loaded = checkpoint_epoch(values["load"]) if values.get("load") else None
        start = 0 if loaded is None else loaded + 1
        final = start + int(values["max_epochs"])
        overrides = {**overrides,
                     "test_every": tested_every(final, int(values.get("test_every", 10)))}
        values["test_every"] = overrides["test_every"]
    argv = ["--config", config, *flags(overrides)]
    return Step(name, script, argv, values["cv_dir"], final, log, values)


def exit_text(code: int) -> str:
    """``killed by signal SIGKILL`` for a process ended by a signal, else the exit status.
    A status of 128 + n is how a script that caught signal n (SIGTERM, Ctrl-C) exits."""
    number = -code if code < 0 else code - 128 if code > 128 else 0
    try:
        return f"killed by signal {signal.Signals(number).name}" if number else \
            f"exit status {code}"
    except ValueError:
        return f"exit status {code}"


def run_python(argv: Sequence[str], log: str) -> str | None:
    """Run ``python <argv>`` in a child process (from the current folder, this repository
    importable) with its output appended to ``log``; None on success, else why it failed."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads()), **os.environ, "PYTHONPATH": path}
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(['python', *argv])}\n")
        f.flush()
        child = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        code = _wait(child)
    if code == 0:
        return None
    status = exit_text(code)
    if status.startswith("killed"):
        return status
    return _last_line(log) or status


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # unwinds through _wait, which stops the child


def _wait(child: subprocess.Popen, grace: float = 60.0) -> int:
    """The child's exit status. When this process is stopped (Ctrl-C, SIGTERM), the child
    gets SIGTERM and ``grace`` seconds to release its run folder before it is killed."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry_point(script: str):
    """The root script ``script`` (``test.py``, ...) as a module: this repository's file,
    also when the repository is not on ``sys.path`` (``test`` would otherwise be the
    standard library's package)."""
    name = os.path.splitext(script)[0]
    module = sys.modules.get(name)
    if module is not None and os.path.dirname(os.path.abspath(
            getattr(module, "__file__", "") or "")) == ROOT:
        return module
    if ROOT in sys.path:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call_script(script: str, argv: Sequence[str], log: str) -> str | None:
    """Run ``<script>.main(argv)`` in this process with its output appended to ``log``;
    returns None on success, else the error it ended with."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ {shlex.join(['python', script, *argv])}", flush=True)
        try:
            entry_point(script).main(list(argv))
        except SystemExit as err:
            if err.code in (None, 0):
                return None
            if isinstance(err.code, str):
                print(err.code)
                return err.code
            message = exit_text(err.code)
        except Exception as err:  # a bug in the script: keep the traceback in its log
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
    """The one line that reports a failed step or evaluation."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else "failed"
    return f"{what} failed: {last}. Log: {log}. Rerun it with: {command}"


def interrupted(step: Step) -> bool:
    """Whether an earlier run of ``step`` stopped before its final checkpoint: its folder
    holds ``last.t7`` or a checkpoint of an earlier epoch."""
    prefix = "pk" if step.script == "pretrain_resnet.py" else "ckpt"
    return os.path.isfile(os.path.join(step.folder, LAST)) or \
        newest_path(step.folder, prefix) is not None


def run_step(step: Step, *, resume: bool = False, force: bool = False,
             say=print) -> str:
    """Run ``step`` unless it is done; returns its final checkpoint."""
    done = final_checkpoint(step)
    if done and not force:
        say(f"[skip] {step.name}: done ({done})")
        return done
    extra: list[str] = []
    if force and os.path.isdir(step.folder):
        say(f"[force] {step.name}: moved the old run to {move_aside(step.folder)}")
    elif interrupted(step):
        if not resume:
            raise StepError(
                f"step '{step.name}' was interrupted ({step.folder} holds a run without "
                f"its final checkpoint of epoch {step.final_epoch}); rerun with --resume to "
                f"continue it, or --force to start it again")
        extra = ["--resume"]
    say(f"[run]  {step.name} (log: {step.log})")
    error = run_python([script_path(step.script), *step.argv, *extra], step.log)
    final = final_checkpoint(step)
    if error is None and final is None:
        error = f"finished without its final checkpoint (epoch {step.final_epoch}) in " \
                f"{step.folder}"
    if error is not None:
        again = ["--resume"] if interrupted(step) else []
        raise StepError(failure(f"step '{step.name}'", error, step.log, step.command(*again)))
    return final
