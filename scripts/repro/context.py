"""What every reproduction command shares once its options are parsed: the results folder,
the data (generated in smoke runs), the evaluation settings and the Markdown preamble."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch

from models import get_spec
from scripts.repro import outdir, pipeline, smoke
from scripts.repro.gamma import EvalSettings
from scripts.repro.paper import table_meta
from utils.data import DataError, get_dataset

DEFAULT_DATA = {"cifar10": "data/", "cifar100": "data/", "image_folder": "data/imagenet/"}
SMOKE_DATA = {"cifar10": smoke.cifar_data, "image_folder": smoke.imagenet_data}
RUN_CONTROL = ("force", "resume", "workers", "out", "device")  # not part of a command's identity


@dataclass
class ReproContext:
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
            train: bool) -> ReproContext:
    """Claim --out, pick the data (generated in smoke runs) and the evaluation settings."""
    out = args.out or os.path.join("results", args.name)
    identity = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    outdir.claim(out, args.name, identity, argv, args.force, say)
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
    return ReproContext(args, out, data_dir, workers, evals, say)


def preamble(ctx: ReproContext, table: str) -> list[str]:
    lines = []
    caption = table_meta(table).get("caption") if table else None
    if caption:
        lines.append(f"Paper: {caption}.")
    lines.append(f"Command: `{outdir.read_record(ctx.out)['command']}`")
    if ctx.args.smoke:
        lines.append("**Smoke run** on generated data with one-epoch schedules: the numbers "
                     "are not comparable with the paper's.")
    return lines


def model_list(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    models = list(values or default)
    for m in models:
        get_spec(m)  # unknown names raise ValueError listing the valid ones
    return models
