"""The run folder of a training script: paths, logs, checkpoint names, resume state.

``<cv_dir>/`` holds

* ``config.yaml``: the resolved configuration, written before the first step;
* ``metrics.jsonl``: one JSON line per epoch (train statistics, lr, wall time,
  and the test statistics on evaluation epochs), the source of truth;
* ``log/``: tensorboardX scalars under the authors' tags (``train_accuracy``,
  ``train_reward``, ``train_sparsity``, ``train_variance``,
  ``train_unique_policies``, and ``test_*``);
* the authors' checkpoints ``ckpt_E_<epoch>_A_<acc>_R_<reward>_S_<usage>_#_<unique>.t7``
  (keys ``agent``, ``resnet`` after finetuning, ``epoch``, ``reward``, ``acc``);
* ``last.t7``: everything ``--resume`` needs (models, optimizer, epoch, random
  states, config), rewritten atomically after every epoch;
* ``.lock`` while a run uses the folder: its pid, host, start time and command.

Only the main process writes any of it. A second run or resume into a locked
folder stops at once and names the holder; a lock left by a killed process on
this host is taken over. A folder whose run was killed before its first
``last.t7`` resumes from its newest checkpoint (:func:`recovered_state`).
"""
from __future__ import annotations

import contextlib
import datetime
import fnmatch
import glob
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

from tqdm import tqdm

from utils.checkpoint import CheckpointError, read_checkpoint
from utils.errors import UserError
from utils.files import replace_atomically

LAST = "last.t7"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
LOCK = ".lock"
TMP_PREFIX = ".tmp_"  # utils.checkpoint.save_checkpoint writes through these
# checkpoint file names -> the epoch a file was written after
_EPOCH_OF = ((re.compile(r"^ckpt_E_(\d+)_"), 0), (re.compile(r"^pk_E_(\d+)_"), -1))
# our statistic names -> the authors' tensorboard tag suffixes
TB_TAGS = {"accuracy": "accuracy", "reward": "reward", "block_usage": "sparsity",
           "block_usage_std": "variance", "unique_policies": "unique_policies", "loss": "loss"}


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used as asked (it would overwrite a run, or has none to resume)."""


def checkpoints_in(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "*.t7")))


# ---------------------------------------------------------------------------
# The lock: one run per folder
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLock:
    """The lock a run holds on its folder; :meth:`release` removes it (if still ours)."""

    path: str
    holder: dict[str, Any]
    created_folder: bool  # the run made the folder: remove it again if it stays empty

    def release(self) -> None:
        if _read_holder(self.path) == self.holder:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        if self.created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))  # only succeeds when empty


def _read_holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock of this host whose process is gone (killed, or the machine rebooted)."""
    return (holder is not None and holder.get("host") == socket.gethostname()
            and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))


def _describe_holder(path: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return f"{path} exists but cannot be read; remove it if no run uses the folder"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}; wait for it to finish (or stop it), or choose another "
            f"--cv_dir")


def _create_exclusive(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` atomically; False if it exists already.

    The text is written to a private file first and hard-linked into place, so
    no reader ever sees a half-written lock.
    """
    private = f"{path}.{os.getpid()}.{socket.gethostname()}"
    with open(private, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(private)


def acquire_lock(folder: str, command: list[str] | None = None) -> RunLock:
    """Take the run folder for this process, or raise RunFolderError naming the holder.

    A stale lock (this host, process gone) is taken over and said so on stderr.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"--cv_dir {folder} is a file, not a folder")
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(command if command is not None else sys.argv)}
    for _ in range(3):
        try:
            created_lock = _create_exclusive(path, json.dumps(holder) + "\n")
        except OSError as err:  # read-only, no permission, disk full
            raise OSError(err.errno, f"{err.strerror}: cannot write in the run folder",
                          folder) from err
        if created_lock:
            return RunLock(path, holder, created)
        current = _read_holder(path)
        if not _is_stale(current):
            raise RunFolderError(f"{folder} is in use by another run: "
                                 f"{_describe_holder(path, current)}")
        _remove_stale(path, current)
    raise RunFolderError(f"{folder}: could not take {path}; another run is starting there")


def _remove_stale(path: str, stale: dict[str, Any]) -> None:
    """Remove the lock of a dead process, unless another run replaced it meanwhile."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another starting run removed it first
    if _read_holder(aside) != stale:  # a live run's lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    else:
        print(f"taking over {path} of pid {stale['pid']} (no longer running)", file=sys.stderr)
    os.remove(aside)


# ---------------------------------------------------------------------------
# What a run finds in its folder
# ---------------------------------------------------------------------------


def remove_orphans(folder: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that a kill interrupted."""
    orphans = glob.glob(os.path.join(folder, TMP_PREFIX + "*"))
    for path in orphans:
        os.remove(path)
    return orphans


def _epoch_of(name: str) -> int | None:
    for pattern, shift in _EPOCH_OF:
        match = pattern.match(name)
        if match:
            return int(match.group(1)) + shift
    return None


def newest_checkpoint(folder: str, prefix: str | None = None) -> tuple[str, int] | None:
    """``(path, epoch)`` of the stage checkpoint written after the latest epoch, if any;
    ``prefix`` ``"ckpt"`` or ``"pk"`` looks at those files only."""
    found = [(e, p) for p in checkpoints_in(folder)
             if (prefix is None or os.path.basename(p).startswith(f"{prefix}_E_"))
             and (e := _epoch_of(os.path.basename(p))) is not None]
    return (max(found)[1], max(found)[0]) if found else None


def check_run_folder(folder: str, resume: bool) -> str | None:
    """The ``last.t7`` to resume from, or None for a fresh run.

    A fresh run refuses a folder that already holds checkpoints; ``--resume``
    needs a ``last.t7`` there, or a stage checkpoint and ``config.yaml`` to
    recover from (then the path of that checkpoint is returned).
    """
    last = os.path.join(folder, LAST)
    if resume:
        if os.path.isfile(last):
            return last
        newest = newest_checkpoint(folder)
        if newest is None:
            raise RunFolderError(f"--resume: no {LAST} in {folder} to resume from (and no "
                                 f"checkpoint to recover from); start a fresh run there")
        if not os.path.isfile(os.path.join(folder, CONFIG)):
            raise RunFolderError(
                f"--resume: {folder} has no {LAST} and no {CONFIG}, so its run cannot be "
                f"continued; start a new run with --load {newest[0]} (or --base_ckpt for a "
                f"pretrained ResNet) in another --cv_dir")
        return newest[0]
    found = checkpoints_in(folder)
    if found:
        raise RunFolderError(
            f"{folder} already holds checkpoints ({os.path.basename(found[0])}"
            f"{', ...' if len(found) > 1 else ''}); pass --resume to continue that run, "
            f"or choose another --cv_dir")
    return None


def read_resume_state(path: str) -> dict[str, Any]:
    """What ``--resume`` continues from: a ``last.t7``, or a recovered stage checkpoint."""
    if os.path.basename(path) != LAST:
        return recovered_state(path)
    state = read_checkpoint(path)
    if not isinstance(state, Mapping) or "config" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a resumable checkpoint (no 'config'/'epoch')")
    return dict(state)


def _first_epoch(folder: str, config: Mapping[str, Any]) -> int:
    """The first epoch of the run in ``folder``: the first line of its metrics."""
    lines = read_metrics(folder)
    if lines:
        return int(lines[0]["epoch"])
    if config.get("load"):
        raise RunFolderError(f"--resume: {folder} has no {METRICS} telling where its run "
                             f"started; start a new run with --load in another --cv_dir")
    return 0


def recovered_state(path: str) -> dict[str, Any]:
    """A resume state built from a stage checkpoint, for a run killed before its first
    ``last.t7``: the networks of that epoch, the saved config, no optimizer state and no
    random states (the optimizer starts fresh, the random states from the seed)."""
    from utils.config import load_yaml  # utils.config imports the models; keep this light

    folder = os.path.dirname(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a stage checkpoint")
    config = load_yaml(os.path.join(folder, CONFIG))
    networks = {k: ckpt[k] for k in ("agent", "resnet") if k in ckpt}
    if "state_dict" in ckpt:  # a pretraining checkpoint
        networks["resnet"] = ckpt["state_dict"]
    print(f"resuming from {os.path.basename(path)}: {folder} has no {LAST} (the run was "
          f"stopped before writing it); the networks continue from that checkpoint, the "
          f"optimizer state and the random states start fresh", file=sys.stderr)
    return {**networks, "optimizer": None, "rng": None, "config": config,
            "epoch": _epoch_of(os.path.basename(path)), "model": ckpt.get("model"),
            "first_epoch": _first_epoch(folder, config), "recovered_from": path}


def _epoch_record(line: str) -> dict[str, Any] | None:
    """The record of one ``metrics.jsonl`` line, or None unless it is a JSON object with an
    integer ``epoch`` (not a bool; an integral float such as ``3.0`` reads as 3)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    epoch = record.get("epoch")
    if isinstance(epoch, float) and epoch.is_integer():
        record["epoch"] = epoch = int(epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return None
    return record


def _read_metrics_lines(path: str) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """``([(line, record), ...], [numbers of the dropped lines])``; blank lines are neither."""
    kept, dropped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _epoch_record(line)
            if record is None:
                dropped.append(number)
            else:
                kept.append((line if line.endswith("\n") else line + "\n", record))
    return kept, dropped


def _dropped_note(path: str, dropped: list[int]) -> str:
    """``<file>: dropped N line(s) that are not epoch records ...: line(s) 3, 5``."""
    shown = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
    if len(dropped) == 1:
        what = "1 line that is not an epoch record"
    else:
        what = f"{len(dropped)} lines that are not epoch records"
    return (f"{path}: dropped {what} (a JSON object with an integer 'epoch'; a kill can "
            f"cut the last line short): line{'s' if len(dropped) > 1 else ''} {shown}")


def read_metrics(folder: str, on_dropped: Callable[[str], None] = lambda note: None
                 ) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (none if it is missing). A line that is not a JSON
    object with an integer ``epoch`` (the half-written last line of a killed run, a line
    edited by hand) is skipped; ``on_dropped`` gets one note naming the file, how many
    lines were skipped and which."""
    path = os.path.join(folder, METRICS)
    if not os.path.isfile(path):
        return []
    kept, dropped = _read_metrics_lines(path)
    if dropped:
        on_dropped(_dropped_note(path, dropped))
    return [record for _, record in kept]


def _fault_point(path: str, f) -> None:
    """Test hook: ``BLOCKDROP_TEST_FAULT=kill:<file name pattern>`` kills the process
    (SIGKILL) halfway through rewriting a matching file, so that tests can check what a
    kill leaves behind."""
    action, _, pattern = os.environ.get("BLOCKDROP_TEST_FAULT", "").partition(":")
    if action == "kill" and fnmatch.fnmatch(os.path.basename(path), pattern):
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def replace_text(path: str, lines: list[str]) -> None:
    """Make ``path`` hold ``lines``, atomically: they are written to a temporary file in
    the same folder, synced, and renamed over ``path``. A crash or kill at any point leaves
    either the old file or the new one (and at worst a ``.tmp_`` file that the next run
    removes); a failed write removes the temporary file and raises."""
    def write(f) -> None:
        half = len(lines) // 2
        f.writelines(lines[:half])
        _fault_point(path, f)
        f.writelines(lines[half:])
    replace_atomically(path, write, prefix=TMP_PREFIX, suffix="_" + os.path.basename(path))


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def blockdrop_name(epoch: int, stats: Mapping[str, Any]) -> str:
    """The authors' checkpoint file name."""
    return "ckpt_E_%d_A_%.3f_R_%.2E_S_%.2f_#_%d.t7" % (
        epoch, stats["accuracy"], stats["reward"], stats["block_usage"], stats["unique_policies"])


def format_line(epoch: int | None, stats: Mapping[str, Any]) -> str:
    """The authors' log line: ``E: 3 | A: ...`` (train) or ``TS - A: ...`` (test)."""
    head = "E: %d | " % epoch if epoch is not None else "TS - "
    if "block_usage" not in stats:
        return head + "A: %.3f | L: %.4f" % (stats["accuracy"], stats["loss"])
    return head + "A: %.3f | R: %.2E | S: %.3f | V: %.3f | #: %d" % (
        stats["accuracy"], stats["reward"], stats["block_usage"], stats["block_usage_std"],
        stats["unique_policies"])


class RunLog:
    """metrics.jsonl, tensorboardX scalars and the printed log lines (main process only)."""

    def __init__(self, folder: str, enabled: bool, resume_epoch: int | None = None):
        self.enabled = enabled
        self.start = time.time()
        self.folder = folder
        self.writer = None
        if not enabled:
            return
        os.makedirs(folder, exist_ok=True)
        self._truncate(-1 if resume_epoch is None else resume_epoch)
        from tensorboardX import SummaryWriter  # heavy import, only where a log is written
        self.writer = SummaryWriter(os.path.join(folder, "log"), flush_secs=5)

    def _truncate(self, last_epoch: int) -> None:
        """Keep the records up to ``last_epoch``: later ones come from a run killed before
        it saved; a fresh run (-1) keeps none. Lines that are not epoch records (a line cut
        short by a kill) are dropped with a note on stderr. The file is replaced atomically,
        so a kill during the rewrite keeps the earlier records."""
        path = os.path.join(self.folder, METRICS)
        if not os.path.isfile(path):
            return
        kept, dropped = _read_metrics_lines(path)
        if dropped:
            print(_dropped_note(path, dropped), file=sys.stderr)
        lines = [line for line, record in kept if record["epoch"] <= last_epoch]
        if dropped or len(lines) < len(kept) or not _ends_with_newline(path):
            replace_text(path, lines)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def scalars(self, prefix: str, epoch: int, stats: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in TB_TAGS.items():
            if key in stats:
                self.writer.add_scalar(f"{prefix}_{tag}", stats[key], epoch)

    def epoch(self, epoch: int, lr: float, train: Mapping[str, Any],
              test: Mapping[str, Any] | None = None, **extra: Any) -> None:
        """Print, plot and record one epoch."""
        if not self.enabled:
            return
        tqdm.write(format_line(epoch, train))
        self.scalars("train", epoch, train)
        line = {"epoch": epoch, "lr": lr, "time": round(time.time() - self.start, 3),
                "train": dict(train), **extra}
        if test is not None:
            tqdm.write(format_line(None, test))
            self.scalars("test", epoch, test)
            line["test"] = dict(test)
        with open(os.path.join(self.folder, METRICS), "a") as f:
            f.write(json.dumps(line) + "\n")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
