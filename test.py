"""Evaluate a BlockDrop model: accuracy, block usage, FLOPs and unique policies.

    python test.py --model R110_C10 \
        --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7

prints the block of the authors' test.py (docs/evaluation.md). Evaluation is
batched: each block runs only on the images whose greedy policy keeps it, and
FLOPs come from the model's analytic table, so the numbers equal those of the
authors' one-image-at-a-time loop.

``--policy`` picks the method that decides (any registered one, ``policies``):
by default the method the checkpoint records (``blockdrop`` for the authors'
files; ``seq`` for BlockDrop-seq), or a fixed policy such as
``firstk``/``randomk``/``distributek`` with ``--k K`` (``--k auto``: the mean
block usage of the learned checkpoint in ``--load``, rounded up). A fixed
policy runs only the base ResNet: the ``resnet`` of ``--load``, else
``--base_ckpt``. ``--out FILE.json`` also writes the statistics as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import ModelSpec, get_spec
from models.flops import flop_table
from policies.registry import method_names
from utils.config import (add_device_args, add_fast_flags, add_model_arg, device_problems,
                          fast_options, make_parser)
from utils.data import get_dataset
from utils.engine import evaluate
from utils.files import write_text
from utils.budget import BudgetChoice, BudgetError, held_out_split, threshold_for_budget
from utils.launch import error_path
from utils.networks import Request, Setup, load_for_eval
from utils.onnx_eval import check_onnx, evaluate_onnx, per_image_flops
from utils.stats import format_eval_block, policy_stats

PROG = "test.py"


def k_value(text: str):
    """``--k``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def writable_folder(folder: str) -> bool:
    """Whether ``folder`` is, or can be created as, a folder this process can write to."""
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(PROG, "BlockDrop evaluation (greedy policy)")
    add_model_arg(p)
    p.add_argument("--data_dir", default="data/", help="folder holding the dataset")
    p.add_argument("--load", default=None,
                   help="BlockDrop checkpoint (agent, optionally resnet); without it the base "
                        "ResNet is evaluated with every block kept")
    p.add_argument("--base_ckpt", default=None,
                   help="pretrained base ResNet, used when the checkpoint holds no 'resnet' "
                        "(default: the model's path under cv/pretrained/)")
    p.add_argument("--policy", default=None, choices=method_names(),
                   help="the method that decides (default: the one the checkpoint records: "
                        "its agent type, or the fixed policy a fixed-policy finetuning "
                        "recorded; blockdrop)")
    p.add_argument("--k", type=k_value, default=None,
                   help="blocks kept by a fixed policy, 1..K, or 'auto' (the mean usage of "
                        "the BlockDrop checkpoint in --load, rounded up)")
    p.add_argument("--seed", type=int, default=None,
                   help="which random draw randomk keeps (default 0, or the checkpoint's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="a learned method's keep threshold, moved from its default (what it "
                        "means for each method: docs/methods.md)")
    p.add_argument("--budget", type=float, default=None,
                   help="mean FLOPs per image to aim at: the threshold whose FLOPs on held-out "
                        "training images come closest is chosen, then the test set evaluated")
    p.add_argument("--budget_images", type=int, default=1000,
                   help="training images held out to choose the --budget threshold")
    p.add_argument("--budget_seed", type=int, default=0,
                   help="which training images are held out for --budget")
    p.add_argument("--onnx", default=None, metavar="FILE.onnx",
                   help="evaluate a model exported by python -m scripts.export with ONNX Runtime "
                        "(CPU) instead of a checkpoint (docs/export.md)")
    p.add_argument("--out", default=None,
                   help="also write the statistics to this JSON file (must not exist)")
    p.add_argument("--batch_size", type=int, default=256)
    add_device_args(p)
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--masked", action="store_true",
                   help="run the masked forward (every block for every image) instead of "
                        "dynamic execution; same numbers, slower")
    add_fast_flags(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.onnx is not None:
        given = [f for f in ("load", "policy", "k", "threshold", "budget")
                 if getattr(args, f) is not None]
        if given:
            p.error(f"--onnx evaluates the exported file, which holds its networks and "
                    f"decisions; leave out --{', --'.join(given)}")
        if args.masked or args.device != "cpu":
            p.error("--onnx runs ONNX Runtime on the CPU; leave out --masked and --device")
    if args.threshold is not None and args.budget is not None:
        p.error("--threshold and --budget both set the threshold; give one")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be a positive number of FLOPs per image, got {args.budget}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        p.error(f"--threshold must be a finite number, got {args.threshold}")
    if args.budget_images < 1:
        p.error(f"--budget_images must be at least 1, got {args.budget_images}")
    if args.out and os.path.exists(args.out):
        p.error(f"--out {args.out} exists; results are not overwritten (remove it or "
                f"choose another file)")
    if args.out and not writable_folder(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its folder cannot be created or written (expected a "
                f"path in a writable folder)")
    try:
        get_spec(args.model)
    except ValueError as err:
        p.error(str(err))
    for problem in device_problems(args.device):
        p.error(problem)
    return args


def statistics(args: argparse.Namespace, spec: ModelSpec, setup: Setup, result,
               device: torch.device) -> dict[str, Any]:
    """The ``--out`` JSON: the printed numbers, unrounded, and what produced them."""
    flops = np.asarray(result.flops, dtype=np.float64)
    stats = result.stats
    return {
        "model": spec.name, "policy": setup.source.name, "k": setup.source.k,
        "checkpoint": args.load, "base_ckpt": setup.base_ckpt, "data_dir": args.data_dir,
        "num_images": int(result.matches.numel()), "accuracy": stats.accuracy,
        "block_usage_mean": stats.block_usage, "block_usage_std": stats.block_usage_std,
        "flops_mean": float(flops.mean()), "flops_std": float(flops.std()),
        "unique_policies": stats.unique_policies, "full_flops": flop_table(spec.name).full_resnet,
        "batch_size": args.batch_size, "device": str(device),
    }


def write_json(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    with error_path(PROG, args.debug):
        evaluate_checkpoint(args)


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def evaluate_exported(args: argparse.Namespace, spec: ModelSpec, loader: DataLoader) -> None:
    """``--onnx``: the same block and JSON from ONNX Runtime's run of the exported file."""
    meta = check_onnx(args.onnx, spec)
    print("loading checkpoints")
    policies, matches, _ = evaluate_onnx(args.onnx, spec, loader)
    flops = per_image_flops(meta, flop_table(spec.name), policies)
    stats = policy_stats(policies, matches)
    print(format_eval_block(stats, flops))
    if args.out:
        write_json({"model": spec.name, "policy": meta.get("blockdrop.method"), "k": None,
                    "checkpoint": None, "onnx": args.onnx, "base_ckpt": None,
                    "data_dir": args.data_dir, "num_images": int(matches.numel()),
                    "accuracy": stats.accuracy, "block_usage_mean": stats.block_usage,
                    "block_usage_std": stats.block_usage_std,
                    "flops_mean": float(np.mean(flops)), "flops_std": float(np.std(flops)),
                    "unique_policies": stats.unique_policies,
                    "full_flops": flop_table(spec.name).full_resnet,
                    "batch_size": args.batch_size, "device": "cpu (ONNX Runtime)"}, args.out)


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """Load the networks, the policy source and the test set; evaluate; print the block."""
    spec = get_spec(args.model)
    device = torch.device(args.device)
    testset = get_dataset(spec, args.data_dir, train=False, download=args.download)
    loader = DataLoader(testset, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    if args.onnx is not None:
        return evaluate_exported(args, spec, loader)
    request = Request(args.load, args.base_ckpt, args.policy, args.k, args.seed, args.threshold)
    print("loading checkpoints")  # the authors' test.py, as are the "loaded ... from" lines
    setup = load_for_eval(spec, request, loader, device, log, say=print)
    setup.rnet.to(device)
    setup.source.to(device)
    chosen = choose_for_budget(args, spec, setup, device) if args.budget is not None else None
    source = setup.at_threshold(spec, chosen.threshold) if chosen else setup.source
    result = evaluate(setup.rnet, source, loader, device, flops=flop_table(spec.name),
                      dynamic=not args.masked, fast=fast_options(args))
    print(format_eval_block(result.stats, result.flops))
    if chosen is not None:
        print("    Threshold: %.4f (for --budget %.2E FLOPs/img)\n"
              "    Held-out FLOPs/img: %.2E (%d training images, seed %d)"
              % (chosen.threshold, args.budget, chosen.held_out_flops, chosen.images,
                 chosen.seed))
    if args.out:
        stats = statistics(args, spec, setup, result, device)
        if chosen is not None or args.threshold is not None:
            stats["threshold"] = chosen.threshold if chosen else args.threshold
        if chosen is not None:
            stats.update(budget=args.budget, held_out_flops=chosen.held_out_flops,
                         held_out_images=chosen.images, held_out_seed=chosen.seed)
        write_json(stats, args.out)


def choose_for_budget(args: argparse.Namespace, spec: ModelSpec, setup: Setup,
                      device: torch.device) -> BudgetChoice:
    """The threshold of the learned method in ``setup`` closest to ``--budget``."""
    if setup.method is None or not setup.method.learned or not setup.method.threshold_help:
        raise BudgetError("--budget chooses a learned method's keep threshold; the fixed "
                          "policy evaluated here has none")
    held = held_out_split(spec, args.data_dir, args.budget_images, args.budget_seed)
    loader = DataLoader(held, batch_size=args.batch_size, num_workers=args.workers)
    low, high = setup.method.threshold_range
    return threshold_for_budget(setup.rnet, lambda t: setup.at_threshold(spec, t), spec, loader,
                                device, args.budget, low, high, seed=args.budget_seed)


if __name__ == "__main__":
    main()
