"""Train the base ResNets that BlockDrop starts from (paper Sec. 4).

The authors took their base networks from ``img_classification_pk_pytorch``
(CIFAR) and torchvision (ImageNet); this script trains equivalent ones:

* CIFAR: SGD (momentum 0.9, weight decay 1e-4), batch 128, lr 0.1 for 164
  epochs, ×0.1 at 50% and 75% of the epochs;
* ImageNet: the standard recipe, batch 256, lr 0.1 for 90 epochs, ×0.1 every
  30; ``--init_torchvision <resnet101 state dict>`` starts from torchvision's
  weights instead of random ones (nothing is downloaded).

It writes ``pk_E_<epochs>_A_<acc>.t7`` files (``{'state_dict': ...}``, the layout
of the authors' base networks) to ``--cv_dir``, by default the folder of the
model's default base checkpoint, ``cv/pretrained/<model>/``. Pass such a file
to cl_training.py / finetune.py / test.py with ``--base_ckpt``.

Besides the epoch lines (``E: %d | A: %.3f | L: %.4f``, ``TS - A: ...``) it prints, in
the authors' words, ``loaded pretrained model from <file>`` for ``--init_torchvision``
and ``# setting learning_rate to %.2E`` when the learning rate is set (the first epoch
and each milestone).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import FlatResNet, ModelSpec, build_resnet, get_spec
from utils.checkpoint import load_base_resnet
from utils.config import add_model_arg, add_parallel_arg, add_run_args, make_parser
from utils.dist import current_info, wrap
from utils.engine import Stage, classifier_train_step, evaluate_classifier, multistep_lr
from utils.launch import Context, Plan, Script, launch

PROG = "pretrain_resnet.py"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        PROG, "Train a base ResNet. Writes pk_E_<epochs>_A_<acc>.t7 (the authors' "
        "base-network layout) to --cv_dir, by default cv/pretrained/<model>/; pass it to the "
        "BlockDrop stages with --base_ckpt.")
    add_model_arg(p)
    p.add_argument("--data_dir", default="data/", help="data directory")
    p.add_argument("--cv_dir", default=None,
                   help="run folder (default: cv/pretrained/<model>/, the folder of the model's "
                        "default base checkpoint); refused if it already holds checkpoints")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    p.add_argument("--batch_size", type=int, default=None,
                   help="global batch size (default: CIFAR 128, ImageNet 256)")
    p.add_argument("--epochs", type=int, default=None, help="default: CIFAR 164, ImageNet 90")
    p.add_argument("--milestones", type=int, nargs="+", default=None,
                   help="epochs at which lr *= lr_decay_ratio (default: CIFAR 50%% and 75%% of "
                        "the epochs, ImageNet every 30)")
    p.add_argument("--lr_decay_ratio", type=float, default=0.1)
    p.add_argument("--init_torchvision", default=None,
                   help="state-dict file of the model's torchvision counterpart (R101_ImgNet: "
                        "resnet101, R50_ImgNet: resnet50) to start from")
    add_parallel_arg(p)
    add_run_args(p, test_every=10, base_ckpt=False)
    return p


def fill_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model's pretraining recipe (``spec.pretrain``) into the options left unset."""
    spec = get_spec(args.model)
    recipe = spec.pretrain
    args.cv_dir = args.cv_dir or os.path.dirname(spec.base_checkpoint)
    args.batch_size = args.batch_size or recipe.batch_size
    args.epochs = args.epochs if args.epochs is not None else recipe.epochs
    if args.milestones is None:
        # a short run keeps the milestones that fall inside it (--epochs 1: none)
        args.milestones = [m for m in recipe.milestones(args.epochs) if m >= 1]
    return args


def check(args: argparse.Namespace) -> list[str]:
    """Problems with the pretraining options (empty if none)."""
    problems = [] if args.epochs >= 1 else [f"--epochs must be >= 1, got {args.epochs}"]
    if any(m < 1 for m in args.milestones):
        problems.append(f"--milestones must be >= 1, got {args.milestones}")
    if args.momentum is not None and args.momentum < 0:
        problems.append(f"--momentum must be >= 0, got {args.momentum}")
    if args.init_torchvision and get_spec(args.model).torchvision_base is None:
        problems.append(f"--init_torchvision: {args.model} has no torchvision counterpart")
    return problems


def load_models(args: argparse.Namespace, spec: ModelSpec, resuming: bool) -> FlatResNet:
    """The ResNet to train: random, or torchvision's weights with ``--init_torchvision``."""
    rnet = build_resnet(spec)
    if args.init_torchvision and not resuming:
        load_base_resnet(rnet, args.init_torchvision)
        if current_info().is_main:
            print("loaded pretrained model from", args.init_torchvision)
    return rnet


def lr_schedule(args: argparse.Namespace, is_main: bool):
    """``epoch -> lr`` of the step schedule; on the main process it prints the authors' line
    ``# setting learning_rate to %.2E`` at epoch 0 and at each milestone, where the
    learning rate is set."""
    def lr_for(epoch: int) -> float:
        lr = multistep_lr(epoch, args.lr, args.lr_decay_ratio, args.milestones)
        if is_main and (epoch == 0 or epoch in args.milestones):
            tqdm.write("# setting learning_rate to %.2E" % lr)
        return lr
    return lr_for


def build_stage(args: argparse.Namespace, spec: ModelSpec, rnet: FlatResNet,
                test_loader: DataLoader, ctx: Context) -> Plan:
    """What pretraining trains: the ResNet with every block kept, plain cross-entropy."""
    rnet.to(ctx.device)
    model = wrap(rnet, ctx.device, ctx.info)  # forward(x) runs the full network
    optimizer = torch.optim.SGD(rnet.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)

    def named_checkpoint(epoch: int, stats):
        done = epoch + 1
        return "pk_E_%d_A_%.3f.t7" % (done, stats["accuracy"]), {
            "state_dict": rnet.state_dict(), "epoch": done, "acc": stats["accuracy"],
            "model": spec.name}

    stage = Stage(
        "pretrain", {"resnet": rnet}, optimizer, model.train,
        lambda epoch: lambda x, y, idx: classifier_train_step(model, x, y, amp=args.amp),
        lambda epoch: evaluate_classifier(rnet, test_loader, ctx.device,
                                          not args.no_progress and ctx.info.is_main),
        lr_schedule(args, ctx.info.is_main),
        named_checkpoint)
    last = args.epochs - 1
    return Plan(stage, 0, args.epochs, lambda e: (e + 1) % args.test_every == 0 or e == last)


SCRIPT = Script(PROG, build_parser, load_models, build_stage, finalize=fill_recipe, checks=check)


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
