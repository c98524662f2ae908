"""The reproduction commands: options, shared setup, and one function per script."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import torch

from models import MODEL_SPECS, get_spec
from scripts.repro import outdir, pipeline, smoke
from scripts.repro.gamma import EvalSettings
from utils.data import DataError, get_dataset
from utils.paper import table_meta

DEFAULT_DATA = {"cifar10": "data/", "cifar100": "data/", "image_folder": "data/imagenet/"}
SMOKE_DATA = {"cifar10": smoke.cifar_data, "image_folder": smoke.imagenet_data}
RUN_CONTROL = ("force", "resume", "workers", "out", "device")  # not part of a command's identity


@dataclass
class Context:
    """What every command shares once its options are resolved."""

    args: argparse.Namespace
    out: str
    data_dir: str
    workers: int
    evals: EvalSettings
    say: Callable[[str], None]

    def plan(self, policy_init: str | None = None) -> pipeline.Plan:
        a = self.args
        return pipeline.Plan(
            cv_root=a.cv_root or os.path.join(self.out, "cv"), data_dir=self.data_dir,
            device=a.device, workers=self.workers, logs=os.path.join(self.out, "logs"),
            smoke=a.smoke, resume=a.resume, force=a.force,
            base_ckpt=getattr(a, "base_ckpt", None), policy_init=policy_init, say=self.say)


def say(text: str) -> None:
    print(text, flush=True)


def dataset_of(models: Sequence[str]) -> str:
    kinds = {get_spec(m).data.kind for m in models}
    if len(kinds) != 1:
        raise DataError(f"the models {', '.join(models)} use different datasets; run them "
                        f"separately")
    return kinds.pop()


def check_data(models: Sequence[str], data_dir: str, train: bool) -> None:
    """Fail early, with the loader's one-line message, when the data is not there."""
    for model in models:
        spec = get_spec(model)
        get_dataset(spec, data_dir, train=False)
        if train:
            get_dataset(spec, data_dir, train=True)


def prepare(args: argparse.Namespace, argv: Sequence[str], models: Sequence[str],
            train: bool) -> Context:
    """Claim --out, pick the data (generated in smoke runs) and the evaluation settings."""
    out = args.out or os.path.join("results", args.name)
    identity = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    outdir.claim(out, args.name, identity, argv, args.force)
    kind = dataset_of(models) if models else "cifar10"
    if args.smoke:
        torch.set_num_threads(1)  # tiny batches: one thread is faster than two on a busy CPU
        if kind not in SMOKE_DATA:
            raise DataError(f"no generated data for {kind} models; smoke runs use "
                            f"{', '.join(SMOKE_DATA)}")
        data_dir = SMOKE_DATA[kind](os.path.join(out, "smoke_data"))
    else:
        data_dir = args.data_dir or DEFAULT_DATA[kind]
        check_data(models, data_dir, train)
    workers = args.workers if args.workers is not None else (0 if args.smoke else 4)
    time_images = getattr(args, "time_images", None) or (4 if args.smoke else 256)
    repeats = getattr(args, "repeats", None) or (1 if args.smoke else 5)
    evals = EvalSettings(data_dir, args.device, args.batch_size, workers, out, args.force,
                         args.time_batch or 1, time_images, repeats, say)
    say(f"{args.name}: results in {out}" + (" (smoke run on generated data)" if args.smoke
                                            else ""))
    return Context(args, out, data_dir, workers, evals, say)


def preamble(ctx: Context, table: str) -> list[str]:
    lines = []
    caption = table_meta(table).get("caption") if table else None
    if caption:
        lines.append(f"Paper: {caption}.")
    with open(os.path.join(ctx.out, outdir.COMMAND_FILE), encoding="utf-8") as f:
        lines.append(f"Command: `{json.load(f)['command']}`")
    if ctx.args.smoke:
        lines.append("**Smoke run** on generated data with one-epoch schedules: the numbers "
                     "are not comparable with the paper's.")
    return lines


def model_list(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    models = list(values or default)
    for m in models:
        get_spec(m)  # unknown names raise ValueError listing the valid ones
    return models


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
    from scripts.repro.tables import run_gamma_table
    run_gamma_table(args, argv, "table3", ("R32_C10", "R110_C10"))


def _run_table4(args, argv):
    from scripts.repro.tables import run_gamma_table
    run_gamma_table(args, argv, "table4", ("R101_ImgNet",))


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
    from scripts.repro.tables import run_compare_gamma
    run_compare_gamma(args, argv)


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
    from scripts.repro.figs import run_figures
    run_figures(args, argv)


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
    from scripts.repro.table1 import run_table1
    run_table1(args, argv)


def _add_table2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="models (default: R32_C10 R110_C10)")
    p.add_argument("--keep", nargs="+", default=None, metavar="MODEL=N",
                   help="blocks kept per image (default: the paper's finetuned usage)")


def _run_table2(args, argv):
    from scripts.repro.table2 import run_table2
    run_table2(args, argv)


COMMANDS: dict[str, Any] = {
    "table1": ("Table 1: BlockDrop vs FirstK/RandomK/DistributeK before and after finetuning",
               _add_table1_args, _run_table1),
    "table2": ("Table 2: time per image of the full ResNet, BlockDrop and BlockDrop-seq",
               _add_table2_args, _run_table2),
    "table3": ("Table 3 (supplement Table 1): CIFAR-10 BlockDrop per γ vs the full ResNets",
               _add_gamma_table_args(("R32_C10", "R110_C10")), _run_table3),
    "table4": ("Table 4 (supplement Table 2): ImageNet BlockDrop (ResNet-101) per γ",
               _add_gamma_table_args(("R101_ImgNet",)), _run_table4),
    "compare_gamma": ("One table and Figure 3 for finetuned models of one network",
                      _add_compare_args, _run_compare),
    "figures": ("Per-image views of one finetuned model: block usage, keep rates, Figures 4-5",
                _add_figures_args, _run_figures),
}


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    COMMANDS[args.name][2](args, argv)
