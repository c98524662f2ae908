"""Evaluate a BlockDrop model: accuracy, block usage, FLOPs and unique policies.

    python test.py --model R110_C10 \
        --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7

prints the block of the authors' test.py (SPEC section 5). Evaluation is
batched: each block runs only on the images whose greedy policy keeps it, and
FLOPs come from the model's analytic table, so the numbers equal those of the
authors' one-image-at-a-time loop.

``--policy`` picks where the decisions come from (Table 1's baselines, Table 2's
BlockDrop-seq; ``models.sources``): ``blockdrop`` (the policy network, default),
``seq`` (BlockDrop-seq; chosen by itself for a seq checkpoint), or a fixed policy
``firstk``/``randomk``/``distributek`` with ``--k K`` (``--k auto``: the mean
block usage of the BlockDrop checkpoint in ``--load``, rounded up). A fixed
policy runs only the base ResNet: the ``resnet`` of ``--load``, else
``--base_ckpt``. ``--out FILE.json`` also writes the statistics as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import FlatResNet, ModelSpec, build_resnet, get_spec
from models.sources import (FIXED_RULES, SOURCE_NAMES, PolicySource, PolicySourceError,
                            build_agent, build_source, ceil_usage, check_k)
from utils.checkpoint import (CheckpointError, agent_type_of, check_agent_type, check_model_tag,
                              load_blockdrop_checkpoint, load_default_base, load_state_strict,
                              read_checkpoint, torchvision_to_flat)
from utils.config import add_device_args, add_model_arg, device_problems, make_parser
from utils.data import get_dataset
from models.fast import add_fast_flags, options_from
from utils.engine import evaluate
from utils.flops import flop_table
from utils.rewards import greedy_policy
from utils.launch import error_path
from utils.stats import format_eval_block, mean32

PROG = "test.py"
LEARNED = ("blockdrop", "seq")


def k_value(text: str):
    """``--k``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


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
    p.add_argument("--policy", default=None, choices=SOURCE_NAMES,
                   help="where the decisions come from (default: the checkpoint's agent type, "
                        "or the fixed policy a fixed-policy finetuning recorded; blockdrop)")
    p.add_argument("--k", type=k_value, default=None,
                   help="blocks kept by a fixed policy, 1..K, or 'auto' (the mean usage of "
                        "the BlockDrop checkpoint in --load, rounded up)")
    p.add_argument("--seed", type=int, default=None,
                   help="which random draw randomk keeps (default 0, or the checkpoint's)")
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
    if args.out and os.path.exists(args.out):
        p.error(f"--out {args.out} exists; results are not overwritten (remove it or "
                f"choose another file)")
    try:
        get_spec(args.model)
    except ValueError as err:
        p.error(str(err))
    for problem in device_problems(args.device):
        p.error(problem)
    return args


@dataclass
class Setup:
    """What test.py evaluates: the ResNet, the policy source and where they came from."""

    rnet: FlatResNet
    source: PolicySource
    base_ckpt: str | None  # the base ResNet file used, None when --load held the ResNet


def choose_policy(args: argparse.Namespace, ckpt: Any) -> dict[str, Any]:
    """``{name, k, seed}``: the flags, else what the checkpoint records, else blockdrop."""
    recorded = ckpt.get("fixed_policy") if isinstance(ckpt, dict) else None
    if args.policy is None and isinstance(recorded, dict):
        return {"name": recorded["name"], "k": args.k if args.k is not None else recorded["k"],
                "seed": args.seed if args.seed is not None else recorded.get("seed", 0)}
    name = args.policy or ("seq" if agent_type_of(ckpt) == "seq" else "blockdrop")
    return {"name": name, "k": args.k, "seed": 0 if args.seed is None else args.seed}


def load_resnet(spec: ModelSpec, ckpt: Any, args: argparse.Namespace,
                log: Callable[[str], None]) -> tuple[FlatResNet, str | None]:
    """The ResNet of ``--load`` if it holds one, else the pretrained base network."""
    rnet = build_resnet(spec)
    if isinstance(ckpt, dict) and "resnet" in ckpt:
        load_state_strict(rnet, torchvision_to_flat(ckpt["resnet"]), args.load, "ResNet")
        log(f"loaded resnet from {os.path.basename(args.load)}")
        return rnet, None
    base = load_default_base(rnet, spec, args.base_ckpt, policy_only=ckpt is not None)
    log(f"loaded base resnet from {base}")
    return rnet, base


def auto_k(spec: ModelSpec, ckpt: Any, path: str | None, loader: DataLoader,
           device: torch.device, log: Callable[[str], None]) -> int:
    """``--k auto``: the BlockDrop agent's mean greedy block usage on the test set, rounded up."""
    if agent_type_of(ckpt) != "blockdrop":
        held = f"{path} holds no BlockDrop agent" if path else "no --load was given"
        raise PolicySourceError(f"--k auto needs a BlockDrop checkpoint in --load ({held}); "
                                f"or give --k between 1 and {spec.num_blocks}")
    agent = build_agent(spec, "blockdrop")
    load_blockdrop_checkpoint(path, None, agent, {"agent": ckpt.get("agent", ckpt.get("net"))})
    agent.to(device).eval()
    with torch.no_grad():
        usage = torch.cat([greedy_policy(agent(x.to(device))[0]).sum(1).cpu() for x, _ in loader])
    mean = mean32(usage.numpy())
    k = ceil_usage(mean)
    log(f"--k auto: mean block usage {mean:.3f} of {os.path.basename(path)} -> K = {k}")
    return k


def setup_fixed(spec, ckpt, choice, args, loader, device, log) -> Setup:
    """A fixed policy on the ResNet of ``--load`` or the base network."""
    k = choice["k"]
    if k is None:
        raise PolicySourceError(f"--policy {choice['name']} needs --k: an integer between 1 "
                                f"and {spec.num_blocks}, or auto")
    if k == "auto":
        k = auto_k(spec, ckpt, args.load, loader, device, log)
    check_k(k, spec.num_blocks, spec.name)
    rnet, base = load_resnet(spec, ckpt, args, log)
    return Setup(rnet, build_source(choice["name"], spec, k=k, seed=choice["seed"]), base)


def setup_learned(spec, ckpt, name: str, args, log) -> Setup:
    """The policy network (``blockdrop``) or BlockDrop-seq gates of ``--load``."""
    if args.k is not None:
        raise PolicySourceError(f"--k applies to the fixed policies "
                                f"({', '.join(FIXED_RULES)}), not to {name}")
    if ckpt is not None:
        check_agent_type(ckpt, args.load, name, flag="--policy")
        if agent_type_of(ckpt) is None:
            raise CheckpointError(f"{args.load} holds no agent; evaluate its ResNet with a "
                                  f"fixed --policy ({', '.join(FIXED_RULES)}) and --k")
    elif name == "seq":
        raise PolicySourceError("--policy seq needs --load with a BlockDrop-seq checkpoint")
    agent = build_agent(spec, name)
    if ckpt is None:
        agent.keep_all()  # the authors' test.py without --load: every block, policy counted
    rnet, base = load_resnet(spec, ckpt, args, log)
    if ckpt is not None:
        load_blockdrop_checkpoint(args.load, None, agent,
                                  {k: v for k, v in ckpt.items() if k != "resnet"})
        log(f"loaded agent from {os.path.basename(args.load)}")
    return Setup(rnet, build_source(name, spec, agent=agent), base)


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> None:
    args = parse_args(argv)
    with error_path(PROG, args.debug):
        evaluate_checkpoint(args)


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """Load the networks, the policy source and the test set; evaluate; print the block."""
    spec = get_spec(args.model)
    device = torch.device(args.device)
    testset = get_dataset(spec, args.data_dir, train=False, download=args.download)
    loader = DataLoader(testset, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    ckpt = read_checkpoint(args.load) if args.load else None
    check_model_tag(ckpt, args.load, spec.name)
    choice = choose_policy(args, ckpt)
    if choice["name"] in LEARNED:
        setup = setup_learned(spec, ckpt, choice["name"], args, log)
    else:
        setup = setup_fixed(spec, ckpt, choice, args, loader, device, log)
    setup.rnet.to(device)
    setup.source.to(device)
    result = evaluate(setup.rnet, setup.source, loader, device, flops=flop_table(spec.name),
                      dynamic=not args.masked, fast=options_from(args))
    print(format_eval_block(result.stats, result.flops))
    if args.out:
        write_json(statistics(args, spec, setup, result, device), args.out)


if __name__ == "__main__":
    main()
