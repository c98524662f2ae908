"""Generated data for the ``--smoke`` runs: the demo's shapes in the CIFAR-10 format, or
the same images as an ImageNet-style folder tree (``train/<class>/``, ``val/<class>/``).

Each split is written under a temporary name and renamed into place when complete, so a
run interrupted while writing it finds no partial split and writes it again.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from scripts.demo_data import generate, write_demo_dataset
from utils.data import CIFAR10Files

SMOKE_TRAIN, SMOKE_TEST = 32, 20  # CIFAR-format images
SMOKE_IMAGENET = (4, 2)  # ImageNet-style images: training and validation, in all (R101 is slow)


def cifar_data(root: str, seed: int = 0) -> str:
    """A CIFAR-10-format folder of the demo's shapes under ``root`` (kept if present)."""
    if not os.path.isdir(os.path.join(root, CIFAR10Files.base_folder)):
        write_demo_dataset(root, SMOKE_TRAIN, SMOKE_TEST, seed=seed)
    return root


def imagenet_data(root: str, seed: int = 0, classes: int = 1000, used: int = 5) -> str:
    """The demo's shapes as PNG files in ``root/train/<class>/`` and ``root/val/<class>/``:
    every one of the ``classes`` folders exists (labels keep their numbers), the images
    sit in the first ``used``. ``val/`` is renamed into place last: with it, both exist."""
    if os.path.isdir(os.path.join(root, "val")) and os.path.isdir(os.path.join(root, "train")):
        return root
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), SMOKE_IMAGENET, strict=True):
        staging = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        try:
            _write_split(staging, n, rng, classes, used)
            final = os.path.join(root, split)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_split(folder: str, n: int, rng: np.random.Generator, classes: int, used: int
                 ) -> None:
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"n{c:04d}"))
    images, labels, _ = generate(n, 0.5, rng)
    for i, (img, label) in enumerate(zip(images, labels % used, strict=True)):
        path = os.path.join(folder, f"n{label:04d}", f"{i:04d}.png")
        Image.fromarray(img).resize((64, 64)).save(path)
