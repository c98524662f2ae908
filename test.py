"""Evaluate a BlockDrop model: accuracy, block usage, FLOPs and unique policies.

    python test.py --model R110_C10 --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7

prints the block of the authors' test.py (SPEC section 5). Evaluation is
batched: each block runs only on the images whose greedy policy keeps it, and
FLOPs come from the model's analytic table, so the numbers equal those of the
authors' one-image-at-a-time loop.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader

from models import MODEL_SPECS, get_spec
from utils.checkpoint import CheckpointError, load_for_eval
from utils.data import DataError, get_dataset
from utils.engine import evaluate
from utils.flops import flop_table
from utils.stats import format_eval_block


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="BlockDrop evaluation (greedy policy)")
    p.add_argument("--model", default="R110_C10", help=f"one of {', '.join(MODEL_SPECS)}")
    p.add_argument("--data_dir", default="data/", help="folder holding the dataset")
    p.add_argument("--load", default=None,
                   help="BlockDrop checkpoint (agent, optionally resnet); without it the base "
                        "ResNet is evaluated with every block kept")
    p.add_argument("--base_ckpt", default=None,
                   help="pretrained base ResNet, used when the checkpoint holds no 'resnet' "
                        "(default: the model's path under cv/pretrained/)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--masked", action="store_true",
                   help="run the masked forward (every block for every image) instead of "
                        "dynamic execution; same numbers, slower")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        spec = get_spec(args.model)
        device = torch.device(args.device)
        rnet, agent = load_for_eval(spec, args.load, args.base_ckpt,
                                    log=lambda msg: print(msg, file=sys.stderr))
        testset = get_dataset(spec, args.data_dir, train=False, download=args.download)
    except (ValueError, RuntimeError, CheckpointError, DataError) as err:
        sys.exit(f"test.py: error: {err}")
    loader = DataLoader(testset, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    rnet.to(device)
    agent.to(device)
    result = evaluate(rnet, agent, loader, device, flops=flop_table(spec.name),
                      dynamic=not args.masked)
    print(format_eval_block(result.stats, result.flops))


if __name__ == "__main__":
    main()
