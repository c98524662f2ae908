"""Reproduce the paper's tables and figures (BlockDrop, CVPR 2018: Tables 1-4, Figures 3-5).

    python -m scripts.reproduce table3 --released cv/ --data_dir data/ --out results/table3
    python -m scripts.reproduce table3 --smoke --out /tmp/t3        (generated data, seconds)

The shell scripts ``scripts/<name>.sh`` call this module. Each command writes
``<out>/<name>.md``, ``<out>/<name>.csv`` and its PNG figures, with the paper's values
beside ours (``configs/paper_results.yaml``). See docs/reproducing.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from models import get_spec
from scripts.cli import OneLineParser, count_problem, folder_problem, guarded, number_problem
from scripts.repro import commands
from utils.config import device_problems

PROG = "reproduce"
DATASETS = {"c10": "C10", "c100": "C100"}


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--data_dir", default=None,
                   help="dataset folder (default: data/ for CIFAR, data/imagenet/ for ImageNet)")
    g.add_argument("--out", default=None, help="results folder (default: results/<name>)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--smoke", action="store_true",
                   help="end-to-end check on generated data with one-epoch schedules")
    g.add_argument("--force", action="store_true",
                   help="rerun finished steps and evaluations; replace another command's --out")
    g.add_argument("--resume", action="store_true", help="continue interrupted training steps")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading workers (default 4; 0 in smoke runs)")
    g.add_argument("--batch_size", type=int, default=256, help="test.py's batch size")
    g.add_argument("--cv_root", default=None,
                   help="folder of the training runs, in the authors' layout (default <out>/cv)")
    return p


def timing_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("wall-clock timing")
    g.add_argument("--time_batch", type=int, default=None,
                   help="batch size of the timed forward passes (default 1, the paper's; "
                        "table2 times batch 1 and this, default 32)")
    g.add_argument("--time_images", type=int, default=None,
                   help="test images timed (default 256; smoke: 4)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed rounds, median (default 5; smoke: 1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m scripts.{PROG}", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="name", required=True)
    parents = [common_parser(), timing_parser()]
    for name, (help_text, add_args, _run) in commands.COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=parents,
                            allow_abbrev=False)
        add_args(sp)
    return p


def _gammas(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``(flag, γ)`` of every γ given: table1's --gamma, the γ tables' --gammas."""
    values = [("--gammas", g) for g in getattr(args, "gammas", None) or []]
    if getattr(args, "gamma", None) is not None:
        values.append(("--gamma", args.gamma))
    return values


def _models(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "models", None) or []) + (
        [args.model] if getattr(args, "model", None) else [])


def _value_problems(args: argparse.Namespace) -> list[str | None]:
    """Counts, γ values, seeds and class indices out of their ranges."""
    found = [count_problem(f"--{flag}", getattr(args, flag, None))
             for flag in ("batch_size", "time_batch", "time_images", "repeats", "num_classes",
                          "top", "per_policy", "per_side")]
    found.append(count_problem("--workers", args.workers, 0, 256))
    found += [number_problem(flag, g, 0.0) for flag, g in _gammas(args)]
    found += [count_problem("--seeds", s, 0, 2**32 - 1) for s in getattr(args, "seeds", None)
              or []]
    found += [count_problem("--classes", c, 0) for c in getattr(args, "classes", None) or []]
    return found


def _name_problems(args: argparse.Namespace) -> list[str | None]:
    """Devices this torch build cannot use, unknown models, the command's own values."""
    found: list[str | None] = list(device_problems(args.device))
    for model in _models(args):
        try:
            get_spec(model)
        except ValueError as err:
            found.append(str(err))
    return found + commands.problems(args)


def _path_problems(args: argparse.Namespace) -> list[str | None]:
    """Folders this process must write into, files it must read."""
    found = [folder_problem("--out", args.out or os.path.join("results", args.name))]
    if args.cv_root:
        found.append(folder_problem("--cv_root", args.cv_root))
    for flag in ("base_ckpt", "load"):
        path = getattr(args, flag, None)
        if path and not os.path.isfile(path):
            found.append(f"--{flag} {path}: no such file")
    return found


def problems(args: argparse.Namespace) -> list[str]:
    """Every problem of the flags that can be seen before any work starts."""
    found = _value_problems(args) + _name_problems(args) + _path_problems(args)
    return [p for p in found if p]


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with one line (status 2) naming every problem of the flags."""
    found = problems(args)
    if found:
        p.exit(2, f"{p.prog} {args.name}: error: {'; '.join(found)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    return guarded(args.name, lambda: commands.run(args, argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
