"""Joint finetuning of the policy and the ResNet (paper Sec. 3.3; SPEC section 4).

Both networks train with Adam, the ResNet in train mode; no curriculum, no
entropy term. Loss per batch: Σ_i (−Σ_k log π(u_ik))·A_i + mean cross-entropy
of the ResNet under the sampled policy, whose forward pass carries the
gradient (the greedy pass does not). The authors' command line works, e.g.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 \\
        --pretrained cv/cl_training/R110_C10/ckpt_E_5300_A_0.754_R_2.22E-01_S_20.10_#_7787.t7 \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/

``--agent seq`` finetunes BlockDrop-seq's gates with the ResNet instead.
``--policy firstk|randomk|distributek --k K`` trains the ResNet alone with
cross-entropy under that fixed policy (Table 1's "ft" columns; docs/policies.md).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from models import FlatResNet, ModelSpec, PolicyNet, build_resnet
from models.seq import SeqNet
from models.sources import build_agent, build_source
from utils.checkpoint import (CheckpointError, check_agent_type, check_model_tag,
                              init_policy, load_blockdrop_checkpoint, load_default_base,
                              load_state_strict, policy_state, read_checkpoint,
                              torchvision_to_flat)
from utils.config import (add_agent_arg, add_authors_args, add_fixed_policy_args,
                          add_policy_init_arg, add_run_args, fixed_policy_problems, make_parser)
from utils.dist import wrap
from utils.policy_init import resolve_policy_init
from utils.engine import (Stage, evaluate_policy, finetune_train_step, fixed_policy_train_step,
                          lr_at, seq_train_step)
from utils.launch import Context, Plan, Script, launch
from utils.run_folder import blockdrop_name
from utils.seeding import keyed_uniform

PROG = "finetune.py"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "BlockDrop joint finetuning")
    add_authors_args(p, lr=1e-4, epoch_step=1600, max_epochs=2000, penalty=-5.0,
                     load_help="checkpoint to load the resnet and agent from; the epoch count "
                               "continues")
    p.add_argument("--pretrained", default=None,
                   help="pretrained policy checkpoint (from curriculum training)")
    add_run_args(p)
    add_policy_init_arg(p)
    add_agent_arg(p)
    add_fixed_policy_args(p)
    return p


def load_pretrained_policy(agent: torch.nn.Module, path: str, name: str,
                           agent_type: str = "blockdrop") -> None:
    """``--pretrained``: the agent of a curriculum checkpoint (``agent`` or old ``net``)."""
    ckpt = read_checkpoint(path)
    check_model_tag(ckpt, path, name)
    check_agent_type(ckpt, path, agent_type)
    state = ckpt.get("agent", ckpt.get("net")) if isinstance(ckpt, dict) else None
    if state is None:
        raise CheckpointError(f"--pretrained {path} is not a policy checkpoint: no 'agent' "
                              f"(or 'net') entry")
    load_state_strict(agent, policy_state(state), path, "policy network")


def load_resnet_only(args: argparse.Namespace, spec: ModelSpec,
                     resuming: bool) -> tuple[FlatResNet, None, int]:
    """Fixed-policy finetuning: the ResNet of ``--load`` or the base network, no agent."""
    rnet = build_resnet(spec)
    if resuming:  # last.t7 holds the ResNet
        return rnet, None, 0
    ckpt = read_checkpoint(args.load) if args.load else None
    check_model_tag(ckpt, args.load, spec.name)
    if isinstance(ckpt, dict) and "resnet" in ckpt:
        load_state_strict(rnet, torchvision_to_flat(ckpt["resnet"]), args.load, "ResNet")
        return rnet, None, int(ckpt.get("epoch", -1)) + 1
    load_default_base(rnet, spec, args.base_ckpt, policy_only=ckpt is not None)
    return rnet, None, 0


def load_models(args: argparse.Namespace, spec: ModelSpec,
                resuming: bool) -> tuple[FlatResNet, nn.Module | None, int]:
    """ResNet and policy as the authors' finetune.py set them up; returns the start epoch."""
    if args.policy:
        return load_resnet_only(args, spec, resuming)
    rnet, agent = build_resnet(spec), build_agent(spec, args.agent)
    if resuming:  # last.t7 holds both networks
        return rnet, agent, 0
    ckpt = read_checkpoint(args.load) if args.load else None
    check_model_tag(ckpt, args.load, spec.name)
    check_agent_type(ckpt, args.load, args.agent)
    if not (isinstance(ckpt, dict) and "resnet" in ckpt):
        load_default_base(rnet, spec, args.base_ckpt)
    if args.pretrained:
        load_pretrained_policy(agent, args.pretrained, spec.name, args.agent)
    elif ckpt is None and args.agent == "blockdrop":
        init_policy(agent, spec, resolve_policy_init(spec, args.policy_init, False))
    if ckpt is None:
        return rnet, agent, 0
    loaded = load_blockdrop_checkpoint(args.load, rnet, agent, ckpt)
    if not loaded["agent"]:
        raise CheckpointError(f"{args.load} holds no policy network ('agent')")
    return rnet, agent, int(ckpt.get("epoch", -1)) + 1


StepFn = Callable[..., object]


def blockdrop_step(args: argparse.Namespace, rnet: FlatResNet, agent: nn.Module,
                   ctx: Context) -> tuple[nn.Module, StepFn]:
    """The one-shot policy network and the ResNet, each wrapped for DDP."""
    ddp_rnet, ddp_agent = wrap(rnet, ctx.device, ctx.info), wrap(agent, ctx.device, ctx.info)

    def step(inputs, targets, noise):
        return finetune_train_step(ddp_rnet, ddp_agent, inputs, targets, noise,
                                   alpha=args.alpha, penalty=args.penalty,
                                   world_size=ctx.info.world_size, amp=args.amp)
    return nn.ModuleList([ddp_rnet, ddp_agent]), step


def seq_step(args: argparse.Namespace, rnet: FlatResNet, agent: nn.Module,
             ctx: Context) -> tuple[nn.Module, StepFn]:
    """BlockDrop-seq: gates and ResNet as one module, masked in train mode."""
    ddp_net = wrap(SeqNet(rnet, agent), ctx.device, ctx.info)

    def step(inputs, targets, noise):
        return seq_train_step(ddp_net, inputs, targets, noise, alpha=args.alpha,
                              penalty=args.penalty, world_size=ctx.info.world_size,
                              amp=args.amp)
    return ddp_net, step


STEPS = {"blockdrop": blockdrop_step, "seq": seq_step}


def build_stage(args: argparse.Namespace, spec: ModelSpec,
                networks: tuple[FlatResNet, PolicyNet | None, int], test_loader: DataLoader,
                ctx: Context) -> Plan:
    """What finetuning trains: both networks, no curriculum (or the ResNet alone under
    a fixed ``--policy``)."""
    if args.policy:
        return build_fixed_stage(args, spec, networks, test_loader, ctx)
    rnet, agent, start_epoch = networks
    K = spec.num_blocks
    rnet.to(ctx.device)
    agent.to(ctx.device)
    trained, train_step = STEPS[args.agent](args, rnet, agent, ctx)
    optimizer = torch.optim.Adam(list(agent.parameters()) + list(rnet.parameters()),
                                 lr=args.lr, weight_decay=args.wd)

    def step_for(epoch: int):
        def step(inputs, targets, indices):
            return train_step(inputs, targets, keyed_uniform(args.seed, epoch, indices, K))
        return step

    def test(epoch: int):
        return evaluate_policy(rnet, agent, test_loader, ctx.device, args.penalty,
                               progress=not args.no_progress and ctx.info.is_main)

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            "agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": epoch,
            "reward": stats["reward"], "acc": stats["accuracy"], "model": spec.name,
            "agent_type": args.agent}

    stage = Stage("finetune", {"agent": agent, "resnet": rnet}, optimizer, trained.train,
                  step_for, test, lambda e: lr_at(e, args.lr, args.lr_decay_ratio, args.epoch_step),
                  named_checkpoint)
    return Plan(stage, start_epoch, args.max_epochs + 1, lambda e: e % args.test_every == 0)


def build_fixed_stage(args: argparse.Namespace, spec: ModelSpec,
                      networks: tuple[FlatResNet, None, int], test_loader: DataLoader,
                      ctx: Context) -> Plan:
    """Table 1's "ft": the ResNet alone, cross-entropy under one fixed keep vector. The
    dropped blocks never run, so they are frozen (and left out of DDP and Adam)."""
    rnet, _, start_epoch = networks
    source = build_source(args.policy, spec, k=args.k, seed=args.seed)
    for t, kept in enumerate(source.vector.tolist()):
        rnet.block(t).requires_grad_(bool(kept))
    rnet.to(ctx.device)
    ddp_rnet = wrap(rnet, ctx.device, ctx.info)
    optimizer = torch.optim.Adam([p for p in rnet.parameters() if p.requires_grad],
                                 lr=args.lr, weight_decay=args.wd)
    recorded = {"name": source.name, "k": source.k, "seed": source.seed}

    def step_for(epoch: int):
        return lambda inputs, targets, indices: fixed_policy_train_step(
            ddp_rnet, source.vector, inputs, targets, amp=args.amp)

    def test(epoch: int):
        return evaluate_policy(rnet, source, test_loader, ctx.device, args.penalty,
                               progress=not args.no_progress and ctx.info.is_main)

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            "resnet": rnet.state_dict(), "fixed_policy": recorded, "epoch": epoch,
            "reward": stats["reward"], "acc": stats["accuracy"], "model": spec.name}

    stage = Stage("finetune_fixed", {"resnet": rnet}, optimizer, ddp_rnet.train, step_for,
                  test, lambda e: lr_at(e, args.lr, args.lr_decay_ratio, args.epoch_step),
                  named_checkpoint)
    return Plan(stage, start_epoch, args.max_epochs + 1, lambda e: e % args.test_every == 0)


SCRIPT = Script(PROG, build_parser, load_models, build_stage, checks=fixed_policy_problems)


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
