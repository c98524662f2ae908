"""Command-line plumbing shared by the training scripts (SPEC section 7).

The authors' flags keep their names and each script's defaults; the options
this project adds (``--config``, ``--seed``, ``--resume``, ...) are the same
for every script. :func:`start` does the per-process setup once: process
group, device, seeds and deterministic mode.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from models import MODEL_SPECS, get_spec
from utils.checkpoint import (CheckpointError, NonFiniteError, load_torchvision_policy_init,
                              read_checkpoint)
from utils.checkpoint import check_model_tag as check_checkpoint_model  # noqa: F401 (scripts)
from utils.config import ConfigError, check_common, save_config, to_plain
from utils.data import get_datasets, make_loaders
from utils.dist import DistInfo, cleanup, device_for, init_distributed, launched_by_torchrun
from utils.engine import Loop, fit, restore
from utils.errors import UserError
from utils.run import LAST, RunFolderError, RunLog, resolve_run
from utils.seeding import seed_everything, set_deterministic


def add_authors_args(p: argparse.ArgumentParser, *, lr: float, epoch_step: int,
                     max_epochs: int, penalty: float, load_help: str) -> None:
    """The flags cl_training.py and finetune.py share, with the script's defaults."""
    p.add_argument("--model", default="R110_C10", help=f"one of {', '.join(MODEL_SPECS)}")
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay")
    p.add_argument("--data_dir", default="data/", help="data directory")
    p.add_argument("--load", default=None, help=load_help)
    p.add_argument("--cv_dir", default="cv/tmp/",
                   help="run folder: checkpoints, config.yaml, metrics.jsonl, log/")
    p.add_argument("--batch_size", type=int, default=256,
                   help="global batch size (split over processes under torchrun)")
    p.add_argument("--epoch_step", type=int, default=epoch_step,
                   help="epochs after which lr is decayed")
    p.add_argument("--max_epochs", type=int, default=max_epochs,
                   help="epochs to run after the first one (the authors' loop runs "
                        "max_epochs + 1 epochs)")
    p.add_argument("--lr_decay_ratio", type=float, default=0.1,
                   help="lr *= lr_decay_ratio every epoch_step epochs")
    p.add_argument("--parallel", action="store_true",
                   help="use all GPUs: launch with torchrun --nproc_per_node=<GPUs> (implied "
                        "under torchrun; without it, a machine with several GPUs is refused "
                        "with the command to run, one GPU runs as usual)")
    p.add_argument("--penalty", type=float, default=penalty,
                   help="gamma: reward for incorrect predictions")
    p.add_argument("--alpha", type=float, default=0.8, help="probability bounding factor")


def add_run_args(p: argparse.ArgumentParser, test_every: int = 10,
                 base_ckpt: bool = True) -> None:
    """The options this project adds to every training script."""
    p.add_argument("--config", default=None,
                   help="YAML of option values (defaults < YAML < flags given explicitly)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (exactly reproducible runs, slower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes per training process")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --cv_dir from its last.t7")
    if base_ckpt:
        p.add_argument("--base_ckpt", default=None,
                       help="pretrained base ResNet, used unless a checkpoint holds a 'resnet' "
                            "(default: the model's path under cv/pretrained/)")
    p.add_argument("--test_every", type=int, default=test_every,
                   help="evaluate and save a checkpoint every this many epochs")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bfloat16 autocast for the forward passes (GPU; allowed on CPU)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")


def add_policy_init_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy_init", default=None,
                   help="R101_ImgNet: torchvision resnet18 state-dict file that initialises the "
                        "policy's ResNet-10 (as in the paper); never downloaded")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None,
          extra_checks=lambda args: [], finalize=lambda args: args
          ) -> tuple[argparse.Namespace, dict | None]:
    """Resolve and validate the configuration; any problem exits (status 2) before training.

    ``finalize`` fills in derived defaults once the model is known.
    """
    def checked_finalize(args: argparse.Namespace) -> argparse.Namespace:
        get_spec(args.model)  # an unknown model raises ValueError listing the valid ones
        return finalize(args)

    try:
        args, state = resolve_run(p, argv, checked_finalize)
    except (ConfigError, RunFolderError, CheckpointError, ValueError) as err:
        p.error(str(err))
    problems = check_common(args) + list(extra_checks(args))
    if args.parallel and not launched_by_torchrun() and torch.cuda.device_count() > 1:
        problems.append(f"--parallel: launch with torchrun --nproc_per_node="
                        f"{torch.cuda.device_count()} {p.prog} ... to use every GPU")
    if problems:
        p.error("; ".join(problems))
    return args, state


@dataclass
class Context:
    info: DistInfo
    device: torch.device


def start(args: argparse.Namespace) -> Context:
    """Join the process group (under torchrun), pick the device, seed, set determinism."""
    info = init_distributed(torch.device(args.device).type)
    device = device_for(args.device, info)
    set_deterministic(args.deterministic)
    seed_everything(args.seed, info.rank)
    return Context(info, device)


def fail(prog: str, err: BaseException) -> NoReturn:
    """Exit with status 1 and one clear line."""
    sys.exit(f"{prog}: error: {err}")


def init_policy(agent: torch.nn.Module, spec, path: str | None) -> bool:
    """``--policy_init``: start the policy's features from the torchvision ResNet that
    ``spec.policy.torchvision_init`` names (resnet18 for the ImageNet ResNet-10)."""
    if path is None:
        return False
    if spec.policy.torchvision_init is None:
        raise ValueError(f"--policy_init: the policy network of {spec.name} has no "
                         "torchvision counterpart (ImageNet models only)")
    state = read_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    load_torchvision_policy_init(agent, state, path)
    return True


def run_stage(prog: str, args: argparse.Namespace, stage, epochs: range, first: int,
              test_due, loader, sampler, ctx: Context, state: dict | None) -> None:
    """Write config.yaml, then train; a NaN loss stops with the last good ``last.t7`` kept."""

    if ctx.info.is_main:
        save_config(args, args.cv_dir)
    log = RunLog(args.cv_dir, ctx.info.is_main, epochs.start - 1 if state else None)
    loop = Loop(epochs, first, test_due, args.cv_dir, args.model, to_plain(args),
                progress=not args.no_progress)
    try:
        fit(stage, loop, loader, sampler, ctx.device, ctx.info, log,
            state["rng"] if state else None)
    except NonFiniteError as err:
        fail(prog, f"{err}; stopped. The last good state is {os.path.join(args.cv_dir, LAST)} "
                   f"(continue with --resume once the cause is fixed)")
    except UserError as err:  # e.g. an image that cannot be decoded, found when it is read
        fail(prog, err)
    finally:
        log.close()
        cleanup()


def loaders_for(args: argparse.Namespace, spec, ctx: Context):
    """``(train_loader, test_loader, train_sampler)`` of this process."""
    return make_loaders(*get_datasets(spec, args.data_dir, args.download), args.batch_size,
                        args.workers, args.seed, ctx.info.rank, ctx.info.world_size,
                        ctx.device.type == "cuda")


def epochs_for(stage, state: dict | None, start_epoch: int, max_epochs: int):
    """The authors' epochs ``range(start, start + max_epochs + 1)``; a resumed run restores
    ``stage`` and continues its range. Returns ``(epochs, first_epoch)``."""
    first = start_epoch
    if state is not None:
        start_epoch = restore(stage, state, LAST) + 1
        first = int(state["first_epoch"])
    return range(start_epoch, first + max_epochs + 1), first
