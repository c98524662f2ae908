"""The reproduction commands: each command's options and the function that runs it.

The shared setup of every command (results folder, data, evaluation settings) is in
:mod:`scripts.repro.context`; the commands themselves are in the table modules.
"""
from __future__ import annotations

import argparse
from typing import Any
from collections.abc import Sequence

from models import MODEL_SPECS
from scripts.repro import figures, pareto, table1, table2, tables

GAMMA_TABLES = {"table3": ("R32_C10", "R110_C10"), "table4": ("R101_ImgNet",)}  # default models


# -- registry -----------------------------------------------------------------------------
def _add_gamma_table_args(default_models: Sequence[str]):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--released", metavar="CV_DIR", default=None,
                       help="evaluate the released checkpoints under CV_DIR (the authors' "
                            "tarball layout: CV_DIR/finetuned/<model>_gamma_<γ>/ckpt_*.t7, "
                            "CV_DIR/pretrained/<model>/) instead of training")
        p.add_argument("--models", nargs="+", default=None,
                       help=f"models (default: {' '.join(default_models)})")
        p.add_argument("--gammas", nargs="+", type=float, default=None,
                       help="γ values (default: all found under --released, else those of "
                            "configs/finetune/<model>_gamma<γ>.yaml)")
        p.add_argument("--base_ckpt", default=None,
                       help="from scratch: this base ResNet instead of the default one or "
                            "pretraining")
        p.add_argument("--policy_init", default=None,
                       help="ImageNet curriculum: torchvision resnet18 weights for the policy "
                            "(see cl_training.py --policy_init)")
    return add


def _run_table3(args, argv):
    tables.run_gamma_table(args, argv, "table3", GAMMA_TABLES["table3"])


def _run_table4(args, argv):
    tables.run_gamma_table(args, argv, "table4", GAMMA_TABLES["table4"])


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="CKPT_OR_RUN_DIR",
                   help="finetuned checkpoints or run folders (newest ckpt_E_* inside) of one "
                        "model")
    p.add_argument("--model", default=None,
                   help=f"the model, when the files do not say ({', '.join(MODEL_SPECS)})")
    p.add_argument("--base_ckpt", default=None,
                   help="base ResNet of the full-ResNet reference point (default: the run's "
                        "config.yaml, else the model's default path)")


def _run_compare(args, argv):
    tables.run_compare_gamma(args, argv)


def _add_figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", default=None, help="finetuned BlockDrop checkpoint")
    p.add_argument("--model", default=None, help="its model (default: read from the "
                                                  "checkpoint or its folder name)")
    p.add_argument("--base_ckpt", default=None,
                   help="base ResNet when the checkpoint holds none")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class indices shown in Figures 4-5 (default: the first --num_classes)")
    p.add_argument("--num_classes", type=int, default=5, help="classes in Figures 4-5")
    p.add_argument("--top", type=int, default=3, help="dominant policies per class (Figure 4)")
    p.add_argument("--per_policy", type=int, default=8, help="images per policy (Figure 4)")
    p.add_argument("--per_side", type=int, default=4,
                   help="images with the fewest/most blocks per class (Figure 5)")


def _run_figures(args, argv):
    figures.run_figures(args, argv)


def _add_table1_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("c10", "c100"), default="c10",
                   help="CIFAR-10 (default models R32_C10 R110_C10) or CIFAR-100 (R32_C100 "
                        "R110_C100)")
    p.add_argument("--models", nargs="+", default=None, help="models (default: by --dataset)")
    p.add_argument("--gamma", type=float, default=None,
                   help="γ of the BlockDrop model (default: the paper's, R32 5, R110 10; "
                        "else 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="RandomK seeds (default 0 1 2; smoke 0 1)")
    p.add_argument("--released", metavar="CV_DIR", default=None,
                   help="take the base, curriculum and finetuned BlockDrop checkpoints from "
                        "CV_DIR (the authors' layout); the fixed-policy finetunings are trained")
    p.add_argument("--base_ckpt", default=None, help="base ResNet to use")


def _run_table1(args, argv):
    table1.run_table1(args, argv)


def _add_table2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="models (default: R32_C10 R110_C10)")
    p.add_argument("--keep", nargs="+", default=None, metavar="MODEL=N",
                   help="blocks kept per image (default: the paper's finetuned usage)")


def _run_table2(args, argv):
    table2.run_table2(args, argv)


COMMANDS: dict[str, Any] = {
    "table1": ("Table 1: BlockDrop vs FirstK/RandomK/DistributeK before and after finetuning",
               _add_table1_args, _run_table1),
    "table2": ("Table 2: time per image of the full ResNet, BlockDrop and BlockDrop-seq",
               _add_table2_args, _run_table2),
    "table3": ("Table 3 (supplement Table 1): CIFAR-10 BlockDrop per γ vs the full ResNets",
               _add_gamma_table_args(GAMMA_TABLES["table3"]), _run_table3),
    "table4": ("Table 4 (supplement Table 2): ImageNet BlockDrop (ResNet-101) per γ",
               _add_gamma_table_args(GAMMA_TABLES["table4"]), _run_table4),
    "compare_gamma": ("One table and Figure 3 for finetuned models of one network",
                      _add_compare_args, _run_compare),
    "figures": ("Per-image views of one finetuned model: block usage, keep rates, Figures 4-5",
                _add_figures_args, _run_figures),
    "pareto": ("Every method on one backbone: accuracy against FLOPs and measured time",
               pareto.add_args, pareto.run_pareto),
}


def problems(args: argparse.Namespace) -> list[str]:
    """The command's own flag problems (those :mod:`scripts.reproduce` cannot know)."""
    if args.name == "table2":
        return table2.keep_problems(args.keep or [])
    if args.name in GAMMA_TABLES:
        return tables.policy_init_problems(args, GAMMA_TABLES[args.name])
    if args.name == "pareto":
        return pareto.problems(args)
    return []


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    COMMANDS[args.name][2](args, argv)
