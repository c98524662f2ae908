"""Generated data for the ``--smoke`` runs: the demo's shapes in the CIFAR-10 format, or
the same images as an ImageNet-style folder tree (``train/<class>/``, ``val/<class>/``)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from scripts.demo_data import generate, write_demo_dataset

SMOKE_TRAIN, SMOKE_TEST = 32, 20  # CIFAR-format images
SMOKE_IMAGENET = (4, 2)  # ImageNet-style images: training and validation, in all (R101 is slow)


def cifar_data(root: str, seed: int = 0) -> str:
    """A CIFAR-10-format folder of the demo's shapes under ``root`` (kept if present)."""
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        write_demo_dataset(root, SMOKE_TRAIN, SMOKE_TEST, seed=seed)
    return root


def imagenet_data(root: str, seed: int = 0, classes: int = 1000, used: int = 5) -> str:
    """The demo's shapes as PNG files in ``root/train/<class>/`` and ``root/val/<class>/``:
    every one of the ``classes`` folders exists (labels keep their numbers), the images
    sit in the first ``used``."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), SMOKE_IMAGENET, strict=True):
        if os.path.isdir(os.path.join(root, split)):
            continue
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"n{c:04d}"))
        images, labels, _ = generate(n, 0.5, rng)
        for i, (img, label) in enumerate(zip(images, labels % used, strict=True)):
            path = os.path.join(root, split, f"n{label:04d}", f"{i:04d}.png")
            Image.fromarray(img).resize((64, 64)).save(path)
    return root
