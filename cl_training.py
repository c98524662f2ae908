"""Curriculum learning of the BlockDrop policy (paper Sec. 3.3, Alg. 1; docs/rewards.md).

The pretrained ResNet is frozen (eval mode, no gradient); only the policy
network is trained, with Adam. At epoch e the policy decides the last
``min(e + 1, K)`` blocks; the others are kept and their log-probabilities
masked out. The authors' command line works unchanged, e.g.

    python cl_training.py --model R110_C10 --cv_dir cv/R110_C10_cl/ --lr 1e-3 \\
        --batch_size 2048 --max_epochs 5000

and so do ``--config configs/cl/R110_C10.yaml``, ``--resume`` and
``torchrun --nproc_per_node=N cl_training.py ...``. ``--agent NAME`` trains
another registered learned method (``seq``: BlockDrop-seq's gates, supplement;
docs/methods.md) with the same reward, baseline and curriculum.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import FlatResNet, ModelSpec, build_resnet
from models.fast import inference_copy
from policies.method import CURRICULUM
from policies.registry import build_source, check_method, get_method
from policies.rewards import curriculum_step
from utils.checkpoint import (CheckpointError, check_model_tag, load_blockdrop_checkpoint,
                              load_default_base, read_checkpoint)
from utils.config import (add_authors_args, add_fast_flags, add_method_args, add_run_args,
                          fast_options, make_parser, method_problems)
from utils.engine import Stage, authors_lr_schedule, evaluate_policy
from utils.optim import make_adam
from utils.launch import Context, Plan, Script, is_rank0, launch, test_every
from utils.run_folder import blockdrop_name
from utils.seeding import keyed_uniform

PROG = "cl_training.py"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "BlockDrop curriculum learning")
    add_authors_args(p, lr=1e-3, epoch_step=10000, max_epochs=10000, penalty=-1.0,
                     load_help="checkpoint to load the agent from; the epoch count continues")
    p.add_argument("--beta", type=float, default=1e-1, help="entropy multiplier")
    p.add_argument("--cl_step", type=int, default=1,
                   help="curriculum: below K the policy decides the last min(epoch+1, K) blocks "
                        "(the value itself is not used, as in the authors' code); K or more "
                        "disables the curriculum")
    add_run_args(p)
    add_method_args(p)
    p.add_argument("--masked", action="store_true",
                   help="run the ResNet masked (every block for every image, the authors' way) "
                        "instead of per-image dynamic execution; same numbers")
    add_fast_flags(p)
    return p


def cl_step_at(flag: int, epoch: int, num_blocks: int) -> int:
    """The blocks the policy decides at ``epoch``: K when ``--cl_step >= K``, else min(e+1, K)."""
    return num_blocks if flag >= num_blocks else curriculum_step(epoch, num_blocks)


def load_models(args: argparse.Namespace, spec: ModelSpec,
                resuming: bool) -> tuple[FlatResNet, nn.Module, int]:
    """Base ResNet (frozen) and the method's agent; ``--load`` restores an agent. Returns
    the start epoch."""
    method = get_method(args.agent)
    rnet, agent = build_resnet(spec), method.build(spec)
    fresh = not (args.load or resuming)
    if fresh:  # e.g. the paper's ImageNet policy starts from torchvision weights: found first
        method.initialise(agent, spec, args, CURRICULUM)
    load_default_base(rnet, spec, args.base_ckpt)
    start_epoch = 0
    if args.load and not resuming:
        ckpt = read_checkpoint(args.load)
        check_model_tag(ckpt, args.load, spec.name)
        check_method(ckpt, args.load, args.agent)
        loaded = load_blockdrop_checkpoint(args.load, None, agent, {
            k: v for k, v in ckpt.items() if k != "resnet"} if isinstance(ckpt, dict) else ckpt)
        if not loaded["agent"]:
            raise CheckpointError(f"{args.load} holds no policy network ('agent')")
        if is_rank0():
            print("loaded agent from", args.load)
        start_epoch = int(ckpt.get("epoch", -1)) + 1
    return rnet, agent, start_epoch


def build_stage(args: argparse.Namespace, spec: ModelSpec,
                networks: tuple[FlatResNet, nn.Module, int], test_loader: DataLoader,
                ctx: Context) -> Plan:
    """What curriculum learning trains: the policy only, with the curriculum of the epoch."""
    rnet, agent, start_epoch = networks
    K = spec.num_blocks
    rnet.to(ctx.device).eval().requires_grad_(False)
    agent.to(ctx.device)
    optimizer = make_adam(agent.parameters(), args.lr, args.wd, args.adam_legacy_eps)
    fast = fast_options(args)
    # the frozen ResNet's no-gradient passes run on an inference copy
    step_rnet = inference_copy(rnet, fast, ctx.device)
    method = get_method(args.agent)
    trained, train_step = method.train_step(CURRICULUM, args, step_rnet, agent, ctx)
    source = build_source(method.name, spec, agent=agent)

    def train_modes() -> None:
        trained.train()
        rnet.eval()
        step_rnet.eval()

    def step_for(epoch: int):
        cl = cl_step_at(args.cl_step, epoch, K)
        if ctx.info.is_main:
            tqdm.write("training the last %d blocks ..." % cl)  # the authors' line

        def step(inputs, targets, indices):
            return train_step(inputs, targets, keyed_uniform(args.seed, epoch, indices, K), cl)
        return step

    def test(epoch: int):
        return evaluate_policy(rnet, source, test_loader, ctx.device, args.penalty,
                               cl_step=cl_step_at(args.cl_step, epoch, K), dynamic=not args.masked,
                               progress=not args.no_progress and ctx.info.is_main, fast=fast)

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            "agent": agent.state_dict(), "epoch": epoch, "reward": stats["reward"],
            "acc": stats["accuracy"], "model": spec.name, **method.record(source)}

    stage = Stage(name=CURRICULUM, modules=method.trained_modules(CURRICULUM, rnet, agent),
                  optimizer=optimizer, train_modes=train_modes, step_for=step_for, test=test,
                  lr_for=authors_lr_schedule(args.lr, args.lr_decay_ratio, args.epoch_step,
                                             tqdm.write if ctx.info.is_main else None),
                  named_checkpoint=named_checkpoint,
                  extra_for=lambda e: {"cl_step": cl_step_at(args.cl_step, e, K)})
    return Plan(stage, start_epoch, args.max_epochs + 1, test_every(args.test_every))


SCRIPT = Script(PROG, build_parser, load_models, build_stage, checks=method_problems,
                kept_on_resume=("agent", "seed"))


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
