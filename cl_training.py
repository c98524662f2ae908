"""Curriculum learning of the BlockDrop policy (paper Sec. 3.3, Alg. 1; SPEC section 4).

The pretrained ResNet is frozen (eval mode, no gradient); only the policy
network is trained, with Adam. At epoch e the policy decides the last
``min(e + 1, K)`` blocks; the others are kept and their log-probabilities
masked out. The authors' command line works unchanged, e.g.

    python cl_training.py --model R110_C10 --cv_dir cv/R110_C10_cl/ --lr 1e-3 \\
        --batch_size 2048 --max_epochs 5000

and so do ``--config configs/cl/R110_C10.yaml``, ``--resume`` and
``torchrun --nproc_per_node=N cl_training.py ...``. ``--agent seq`` trains
BlockDrop-seq's gates instead of the one-shot policy network (supplement,
docs/policies.md) with the same reward, baseline and curriculum.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from models import FlatResNet, ModelSpec, PolicyNet, build_resnet
from models.fast import add_fast_flags, inference_copy, options_from
from models.seq import SeqNet
from models.sources import build_agent
from utils.checkpoint import (CheckpointError, check_agent_type, check_model_tag, init_policy,
                              load_blockdrop_checkpoint, load_default_base, read_checkpoint)
from utils.config import (add_agent_arg, add_authors_args, add_policy_init_arg, add_run_args,
                          agent_problems, make_parser)
from utils.dist import wrap
from utils.engine import Stage, curriculum_train_step, evaluate_policy, lr_at, seq_train_step
from utils.policy_init import resolve_policy_init
from utils.launch import Context, Plan, Script, launch
from utils.rewards import curriculum_step
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
    add_policy_init_arg(p)
    add_agent_arg(p)
    p.add_argument("--masked", action="store_true",
                   help="run the ResNet masked (every block for every image, the authors' way) "
                        "instead of per-image dynamic execution; same numbers")
    add_fast_flags(p)
    return p


def cl_step_at(flag: int, epoch: int, num_blocks: int) -> int:
    """The blocks the policy decides at ``epoch``: K when ``--cl_step >= K``, else min(e+1, K)."""
    return num_blocks if flag >= num_blocks else curriculum_step(epoch, num_blocks)


def load_models(args: argparse.Namespace, spec: ModelSpec,
                resuming: bool) -> tuple[FlatResNet, PolicyNet, int]:
    """Base ResNet (frozen) and policy; ``--load`` restores an agent. Returns the start epoch."""
    rnet, agent = build_resnet(spec), build_agent(spec, args.agent)
    # the paper's ImageNet policy starts from torchvision weights: found or asked for first
    init = None
    if args.agent == "blockdrop" and not (args.load or resuming):
        init = resolve_policy_init(spec, args.policy_init)
    load_default_base(rnet, spec, args.base_ckpt)
    start_epoch = 0
    if args.load and not resuming:
        ckpt = read_checkpoint(args.load)
        check_model_tag(ckpt, args.load, spec.name)
        check_agent_type(ckpt, args.load, args.agent)
        loaded = load_blockdrop_checkpoint(args.load, None, agent, {
            k: v for k, v in ckpt.items() if k != "resnet"} if isinstance(ckpt, dict) else ckpt)
        if not loaded["agent"]:
            raise CheckpointError(f"{args.load} holds no policy network ('agent')")
        start_epoch = int(ckpt.get("epoch", -1)) + 1
    elif not resuming:
        init_policy(agent, spec, init)
    return rnet, agent, start_epoch


StepFn = Callable[..., object]


def blockdrop_step(args: argparse.Namespace, rnet: FlatResNet, agent: nn.Module,
                   ctx: Context) -> tuple[nn.Module, StepFn]:
    """The one-shot policy network: both ResNet passes without gradient (Alg. 1)."""
    ddp_agent = wrap(agent, ctx.device, ctx.info)

    def step(inputs, targets, noise, cl_step):
        return curriculum_train_step(rnet, ddp_agent, inputs, targets, noise, alpha=args.alpha,
                                     beta=args.beta, penalty=args.penalty, cl_step=cl_step,
                                     dynamic=not args.masked, amp=args.amp)
    return ddp_agent, step


def seq_step(args: argparse.Namespace, rnet: FlatResNet, agent: nn.Module,
             ctx: Context) -> tuple[nn.Module, StepFn]:
    """BlockDrop-seq: gates and frozen ResNet as one module, decisions block by block."""
    ddp_net = wrap(SeqNet(rnet, agent), ctx.device, ctx.info)
    mode = "masked" if args.masked else "grouped"

    def step(inputs, targets, noise, cl_step):
        return seq_train_step(ddp_net, inputs, targets, noise, alpha=args.alpha,
                              penalty=args.penalty, beta=args.beta, cl_step=cl_step, mode=mode,
                              amp=args.amp)
    return ddp_net, step


STEPS = {"blockdrop": blockdrop_step, "seq": seq_step}


def build_stage(args: argparse.Namespace, spec: ModelSpec,
                networks: tuple[FlatResNet, PolicyNet, int], test_loader: DataLoader,
                ctx: Context) -> Plan:
    """What curriculum learning trains: the policy only, with the curriculum of the epoch."""
    rnet, agent, start_epoch = networks
    K = spec.num_blocks
    rnet.to(ctx.device).eval().requires_grad_(False)
    agent.to(ctx.device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, weight_decay=args.wd)
    fast = options_from(args)
    # the frozen ResNet's no-gradient passes run on an inference copy
    step_rnet = inference_copy(rnet, fast, ctx.device)
    trained, train_step = STEPS[args.agent](args, step_rnet, agent, ctx)

    def train_modes() -> None:
        trained.train()
        rnet.eval()
        step_rnet.eval()

    def step_for(epoch: int):
        cl = cl_step_at(args.cl_step, epoch, K)

        def step(inputs, targets, indices):
            return train_step(inputs, targets, keyed_uniform(args.seed, epoch, indices, K), cl)
        return step

    def test(epoch: int):
        return evaluate_policy(rnet, agent, test_loader, ctx.device, args.penalty,
                               cl_step=cl_step_at(args.cl_step, epoch, K), dynamic=not args.masked,
                               progress=not args.no_progress and ctx.info.is_main, fast=fast)

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            "agent": agent.state_dict(), "epoch": epoch, "reward": stats["reward"],
            "acc": stats["accuracy"], "model": spec.name, "agent_type": args.agent}

    stage = Stage("cl", {"agent": agent}, optimizer, train_modes, step_for, test,
                  lambda e: lr_at(e, args.lr, args.lr_decay_ratio, args.epoch_step),
                  named_checkpoint, lambda e: {"cl_step": cl_step_at(args.cl_step, e, K)})
    return Plan(stage, start_epoch, args.max_epochs + 1, lambda e: e % args.test_every == 0)


SCRIPT = Script(PROG, build_parser, load_models, build_stage, checks=agent_problems)


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
