"""Generated data for the ``--smoke`` runs: the demo's shapes in the CIFAR-10 format, or
the same images as an ImageNet-style folder tree (``train/<class>/``, ``val/<class>/``)."""
from __future__ import annotations

import os

import numpy as np

SMOKE_TRAIN, SMOKE_TEST = 64, 40  # CIFAR-format images
SMOKE_IMAGENET = (10, 5)  # ImageNet-style images: training and validation, in all


def cifar_data(root: str, seed: int = 0) -> str:
    """A CIFAR-10-format folder of the demo's shapes under ``root`` (kept if present)."""
    from utils.demo_data import write_demo_dataset

    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        write_demo_dataset(root, SMOKE_TRAIN, SMOKE_TEST, seed=seed)
    return root


def imagenet_data(root: str, seed: int = 0, classes: int = 5) -> str:
    """The demo's shapes as PNG files in ``root/train/<class>/`` and ``root/val/<class>/``."""
    from PIL import Image

    from utils.demo_data import CLASSES, generate

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), SMOKE_IMAGENET, strict=False):
        if os.path.isdir(os.path.join(root, split)):
            continue
        images, labels, _ = generate(n, 0.5, rng)
        for i, (img, label) in enumerate(zip(images, labels % classes, strict=False)):
            folder = os.path.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).resize((64, 64)).save(os.path.join(folder, f"{i:04d}.png"))
    return root
