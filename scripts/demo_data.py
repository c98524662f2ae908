"""A small, learnable dataset with a known difficulty per image, for the demo.

Ten classes of simple shapes are drawn on 32x32 images, each class in its own
hue. *Easy* images show a clean shape in full colour. *Hard* images show the
same kind of shape with its colour washed out towards the background, under
pixel noise, with clutter strokes and an occluding patch. The
files are written in the CIFAR-10 python format, so the real data loader
reads them. The difficulty of every image is stored in the same pickles under
an extra ``difficulty`` key (0 easy, 1 hard) that the loader ignores. The
demo uses it to check the paper's Sec. 4.3 claim: hard images use more blocks.

    python -m scripts.demo_data generate --out runs/demo/data --train 3000 --test 1000
    python -m scripts.demo_data compare --load <checkpoint> --data_dir runs/demo/data
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import MODEL_SPECS, get_spec
from scripts.cli import OneLineParser, count_problem, folder_problem, guarded
from utils.data import CIFAR10Files, get_dataset, write_cifar_folder
from utils.engine import evaluate
from utils.networks import Request, load_for_eval

SIZE = 32
MAX_IMAGES = 1_000_000  # 3 GB of images in memory
CLASSES = ("disc", "square", "triangle", "plus", "cross", "hbar", "vbar", "ring", "diamond",
           "frame")


def _shape_mask(kind: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    dist = np.sqrt(dy ** 2 + dx ** 2)
    w = max(1.5, r / 3)
    masks = {
        0: dist <= r,
        1: (abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85),
        2: (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.55),
        3: ((abs(dy) <= w) & (abs(dx) <= r)) | ((abs(dx) <= w) & (abs(dy) <= r)),
        4: ((abs(dy - dx) <= w * 1.2) | (abs(dy + dx) <= w * 1.2)) & (abs(dx) <= r * 0.8),
        5: (abs(dy) <= w) & (abs(dx) <= r * 1.1),
        6: (abs(dx) <= w) & (abs(dy) <= r * 1.1),
        7: (dist <= r) & (dist >= r * 0.55),
        8: (abs(dy) + abs(dx)) <= r,
        9: ((abs(dy) <= r * 0.9) & (abs(dx) <= r * 0.9))
        & ~((abs(dy) <= r * 0.5) & (abs(dx) <= r * 0.5)),
    }
    return masks[kind]


def _class_colour(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A saturated colour whose hue belongs to the class, with some jitter."""
    hue = (kind / len(CLASSES) + rng.uniform(-0.03, 0.03)) % 1.0
    sat, val = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val),
                     (val, p, q)][i])


def draw(kind: int, hard: bool, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image (32, 32, 3) of shape ``kind``; hard images are degraded."""
    r = rng.uniform(7, 11)
    cy, cx = rng.uniform(11, 21, size=2)
    background = np.full(3, rng.uniform(0.25, 0.75)) + rng.uniform(-0.05, 0.05, size=3)
    colour = _class_colour(kind, rng)
    # hard images wash the class colour out towards the background
    contrast = rng.uniform(0.35, 0.5) if hard else 1.0
    colour = np.clip(background + (colour - background) * contrast, 0, 1)
    img = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
    img[_shape_mask(kind, cy, cx, r)] = colour
    if hard:
        for _ in range(2):  # clutter strokes in the shape's colour
            mask = np.zeros((SIZE, SIZE), bool)
            if rng.random() < 0.5:
                mask[rng.integers(0, SIZE), :] = True
            else:
                mask[:, rng.integers(0, SIZE)] = True
            img[mask] = colour
        py, px = rng.integers(4, SIZE - 10, size=2)  # an occluding patch
        img[py:py + 6, px:px + 6] = rng.uniform(0, 1)  # grey: no colour cue
        img = img + rng.normal(0, 0.08, size=img.shape)
    else:
        img = img + rng.normal(0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def generate(n: int, hard_fraction: float, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images with balanced labels; returns (images, labels, difficulty)."""
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    difficulty = (rng.random(n) < hard_fraction).astype(np.int64)
    images = np.stack([draw(int(k), bool(h), rng) for k, h in zip(labels, difficulty, strict=True)])
    return images, labels, difficulty


def write_demo_dataset(root: str, train: int, test: int, hard_fraction: float = 0.5,
                       seed: int = 0) -> str:
    """Write the train and test splits under ``root``; returns the CIFAR-10 folder.

    The folder is written under a temporary name and renamed into place when complete,
    so an interrupted write never leaves a partial ``cifar-10-batches-py/`` behind."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, CIFAR10Files.base_folder)
    staging = tempfile.mkdtemp(prefix=".demo-data-", dir=root)
    try:
        folder = _write_splits(staging, train, test, hard_fraction, seed)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(folder, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_splits(root: str, train: int, test: int, hard_fraction: float, seed: int) -> str:
    """Both splits and the class names in ``root/cifar-10-batches-py``; returns that folder."""
    rng = np.random.default_rng(seed)
    for is_train, n in ((True, train), (False, test)):
        images, labels, difficulty = generate(n, hard_fraction, rng)
        folder = write_cifar_folder(root, images, labels, train=is_train, num_classes=10)
        names = [f for f, _ in (CIFAR10Files.train_list if is_train else CIFAR10Files.test_list)]
        for name, idx in zip(names, np.array_split(np.arange(n), len(names)), strict=True):
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                entry = pickle.load(f)
            entry["difficulty"] = difficulty[idx].tolist()
            with open(path, "wb") as f:
                pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    return folder


def read_difficulty(root: str, train: bool = False) -> np.ndarray:
    """The stored difficulty (0 easy, 1 hard) of every image of a split, in loader order."""
    files = CIFAR10Files.train_list if train else CIFAR10Files.test_list
    out = []
    for name, _ in files:
        with open(os.path.join(root, CIFAR10Files.base_folder, name), "rb") as f:
            entry = pickle.load(f)
        if "difficulty" not in entry:
            raise ValueError(f"{name} under {root} holds no 'difficulty': not a demo dataset")
        out.extend(entry["difficulty"])
    return np.asarray(out, dtype=np.int64)


def compare_difficulty(model: str, load: str, data_dir: str, base_ckpt: str = None,
                       batch_size: int = 256) -> str:
    """Block usage and accuracy of easy vs hard test images under the greedy policy."""
    spec = get_spec(model)
    setup = load_for_eval(spec, Request(load, base_ckpt))
    testset = get_dataset(spec, data_dir, train=False)
    result = evaluate(setup.rnet, setup.source, DataLoader(testset, batch_size=batch_size),
                      torch.device("cpu"), progress=False)
    usage = result.policies.sum(1).numpy()
    correct = result.matches.numpy()
    hard = read_difficulty(data_dir) == 1
    lines = ["    images  count  accuracy  blocks used (of %d)" % spec.num_blocks]
    for name, sel in (("easy", ~hard), ("hard", hard)):
        lines.append("    %-6s %6d  %8.3f  %6.2f \u00B1 %.2f" % (
            name, sel.sum(), correct[sel].mean(), usage[sel].mean(), usage[sel].std()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m scripts.demo_data", allow_abbrev=False,
                      description="The demo's shapes dataset (CIFAR-10 format)")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write the dataset", allow_abbrev=False)
    gen.add_argument("--out", required=True, help="data_dir to write cifar-10-batches-py/ into")
    gen.add_argument("--train", type=int, default=3000)
    gen.add_argument("--test", type=int, default=1000)
    gen.add_argument("--hard_fraction", type=float, default=0.5)
    gen.add_argument("--seed", type=int, default=0)
    cmp_ = sub.add_parser("compare", help="block usage of easy vs hard test images",
                          allow_abbrev=False)
    cmp_.add_argument("--model", default="R32_C10")
    cmp_.add_argument("--load", required=True, help="BlockDrop checkpoint")
    cmp_.add_argument("--data_dir", required=True)
    cmp_.add_argument("--base_ckpt", default=None)
    return p


def problems(args: argparse.Namespace) -> list[str]:
    """Every problem of the flags, found before anything is read or written."""
    if args.command == "compare":
        found = [f"--{flag} {path}: no such file" for flag, path in
                 (("load", args.load), ("base_ckpt", args.base_ckpt))
                 if path and not os.path.isfile(path)]
        if not os.path.isdir(args.data_dir):
            found.append(f"--data_dir {args.data_dir}: no such folder")
        if args.model not in MODEL_SPECS:
            found.append(f"--model: unknown model {args.model!r}; valid names: "
                         f"{', '.join(MODEL_SPECS)}")
        return found
    found = [count_problem("--train", args.train, 5, MAX_IMAGES),
             count_problem("--test", args.test, 1, MAX_IMAGES),
             count_problem("--seed", args.seed, 0, 2**32 - 1),
             folder_problem("--out", args.out)]
    if not 0 <= args.hard_fraction <= 1:
        found.append(f"--hard_fraction must lie in [0, 1], got {args.hard_fraction}")
    return [f for f in found if f]


def run(args: argparse.Namespace) -> None:
    if args.command == "compare":
        print(compare_difficulty(args.model, args.load, args.data_dir, args.base_ckpt))
        return
    folder = write_demo_dataset(args.out, args.train, args.test, args.hard_fraction, args.seed)
    print(f"wrote {args.train} training and {args.test} test images to {folder}")


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    found = problems(args)
    if found:
        p.error("; ".join(found))
    code = guarded("demo_data", lambda: run(args))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
