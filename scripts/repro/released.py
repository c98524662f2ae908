"""Finding checkpoints laid out like the authors' released tarball (docs/checkpoints.md).

    <cv>/finetuned/<model>_gamma_<γ>/ckpt_E_*.t7      jointly finetuned BlockDrop models
    <cv>/cl_learning|cl_training/<model>/ckpt_E_*.t7   curriculum-learning policies
    <cv>/pretrained/<model>/pk_E_*.t7                  base ResNets (R101: ImageNet_R101_224_76.464)

From-scratch runs write the same layout, so one reader serves both.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from collections.abc import Iterable

from models import get_spec
from scripts.repro.steps import checkpoint_epoch, newest_path
from utils.errors import UserError

FINETUNED = "finetuned"
CURRICULUM = ("cl_learning", "cl_training")
_GAMMA_DIR = re.compile(r"^(?P<model>.+)_gamma_(?P<gamma>\d+(?:\.\d+)?)$")
LAYOUT = ("<cv>/finetuned/<model>_gamma_<γ>/ckpt_E_*.t7, <cv>/pretrained/<model>/pk_*.t7 "
          "(the authors' tarball unpacked: cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_...t7)")


class NotFoundError(UserError, FileNotFoundError):
    """No checkpoint where the layout says one should be."""


@dataclass(frozen=True)
class Finetuned:
    model: str
    gamma: float
    checkpoint: str


def gamma_text(gamma: float | None) -> str:
    if gamma is None:
        return "–"
    return str(int(gamma)) if float(gamma).is_integer() else str(gamma)


def parse_run_name(name: str):
    """``(model, gamma)`` of a folder named ``<model>_gamma_<γ>``, else None."""
    m = _GAMMA_DIR.match(os.path.basename(os.path.normpath(name)))
    return (m.group("model"), float(m.group("gamma"))) if m else None


def find_finetuned(cv_dir: str, models: Iterable[str],
                   gammas: Iterable[float] | None = None) -> list[Finetuned]:
    """The newest finetuned checkpoint of every ``<model>_gamma_<γ>`` folder under
    ``cv_dir/finetuned`` for ``models`` (and ``gammas`` when given), by model then γ."""
    models = list(models)
    wanted = None if gammas is None else {float(g) for g in gammas}
    found = []
    for folder in sorted(glob.glob(os.path.join(cv_dir, FINETUNED, "*_gamma_*"))):
        parsed = parse_run_name(folder)
        if parsed is None or parsed[0] not in models:
            continue
        if wanted is not None and parsed[1] not in wanted:
            continue
        ckpt = newest_path(folder)
        if ckpt is not None:
            found.append(Finetuned(parsed[0], parsed[1], ckpt))
    return sorted(found, key=lambda f: (models.index(f.model), f.gamma))


def require_finetuned(cv_dir: str, models: list[str],
                      gammas: Iterable[float] | None = None) -> list[Finetuned]:
    """:func:`find_finetuned`, or one line saying what was looked for, where, and the layout."""
    if not os.path.isdir(cv_dir):
        raise NotFoundError(f"--released {cv_dir}: no such folder; expected the authors' "
                            f"checkpoints laid out as {LAYOUT}")
    found = find_finetuned(cv_dir, models, gammas)
    if not found:
        gam = "" if gammas is None else f" with γ in {', '.join(map(gamma_text, gammas))}"
        raise NotFoundError(
            f"no finetuned checkpoints of {', '.join(models)}{gam} under "
            f"{os.path.join(cv_dir, FINETUNED)}: looked for "
            f"{os.path.join(cv_dir, FINETUNED, '<model>_gamma_<γ>', 'ckpt_E_*.t7')}; expected "
            f"layout {LAYOUT}")
    return found


def base_checkpoint(cv_dir: str, model: str) -> str | None:
    """The model's pretrained base ResNet under ``cv_dir`` (the default file name, else the
    newest ``pk_E_*`` in its folder), or None."""
    default = get_spec(model).base_checkpoint  # cv/pretrained/<model>/<file>
    rel = os.path.relpath(default, "cv")
    path = os.path.join(cv_dir, rel)
    if os.path.isfile(path):
        return path
    return newest_path(os.path.dirname(path), "pk")


def curriculum_checkpoint(cv_dir: str, model: str) -> str | None:
    """The newest curriculum checkpoint of ``model`` under ``cv_dir`` (either folder name)."""
    found = [c for c in (newest_path(os.path.join(cv_dir, d, model)) for d in CURRICULUM)
             if c is not None]
    return max(found, key=lambda p: checkpoint_epoch(p)) if found else None
