"""The run folder of a training script: paths, logs, checkpoint names, resume state (STYLE 6-7).

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
  states, config), rewritten atomically after every epoch.

Only the main process writes any of it.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any
from collections.abc import Mapping

from tqdm import tqdm

from utils.checkpoint import CheckpointError, read_checkpoint
from utils.errors import UserError

LAST = "last.t7"
METRICS = "metrics.jsonl"
# our statistic names -> the authors' tensorboard tag suffixes
TB_TAGS = {"accuracy": "accuracy", "reward": "reward", "block_usage": "sparsity",
           "block_usage_std": "variance", "unique_policies": "unique_policies", "loss": "loss"}


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used as asked (it would overwrite a run, or has none to resume)."""


def checkpoints_in(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "*.t7")))


def check_run_folder(folder: str, resume: bool) -> str | None:
    """The ``last.t7`` to resume from, or None for a fresh run.

    A fresh run refuses a folder that already holds checkpoints; ``--resume``
    needs a ``last.t7`` there.
    """
    last = os.path.join(folder, LAST)
    if resume:
        if not os.path.isfile(last):
            raise RunFolderError(f"--resume: no {LAST} in {folder} to resume from")
        return last
    found = checkpoints_in(folder)
    if found:
        raise RunFolderError(
            f"{folder} already holds checkpoints ({os.path.basename(found[0])}"
            f"{', ...' if len(found) > 1 else ''}); pass --resume to continue that run, "
            f"or choose another --cv_dir")
    return None


def read_resume_state(path: str) -> dict[str, Any]:
    """The content of a ``last.t7``, checked to hold what ``--resume`` needs."""
    state = read_checkpoint(path)
    if not isinstance(state, Mapping) or "config" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a resumable checkpoint (no 'config'/'epoch')")
    return dict(state)


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
        if resume_epoch is not None:
            self._truncate(resume_epoch)
        from tensorboardX import SummaryWriter  # heavy import, only where a log is written
        self.writer = SummaryWriter(os.path.join(folder, "log"), flush_secs=5)

    def _truncate(self, last_epoch: int) -> None:
        """Drop lines of epochs after ``last_epoch`` (written by a run killed before it saved)."""
        path = os.path.join(self.folder, METRICS)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        with open(path, "w") as f:
            f.writelines(lines)

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
