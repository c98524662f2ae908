"""Joint finetuning of the policy and the ResNet (paper Sec. 3.3; SPEC section 4).

Both networks train with Adam, the ResNet in train mode; no curriculum, no
entropy term. Loss per batch: Σ_i (−Σ_k log π(u_ik))·A_i + mean cross-entropy
of the ResNet under the sampled policy, whose forward pass carries the
gradient (the greedy pass does not). The authors' command line works, e.g.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 \\
        --pretrained cv/cl_training/R110_C10/ckpt_E_5300_A_0.754_R_2.22E-01_S_20.10_#_7787.t7 \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from models import FlatResNet, ModelSpec, PolicyNet, build_policy, build_resnet
from utils.checkpoint import (CheckpointError, check_model_tag, init_policy,
                              load_blockdrop_checkpoint, load_default_base, load_state_strict,
                              policy_state, read_checkpoint)
from utils.config import add_authors_args, add_policy_init_arg, add_run_args, make_parser
from utils.dist import wrap
from utils.policy_init import resolve_policy_init
from utils.engine import Stage, evaluate_policy, finetune_train_step, lr_at
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
    return p


def load_pretrained_policy(agent: torch.nn.Module, path: str, name: str) -> None:
    """``--pretrained``: the agent of a curriculum checkpoint (``agent`` or old ``net``)."""
    ckpt = read_checkpoint(path)
    check_model_tag(ckpt, path, name)
    state = ckpt.get("agent", ckpt.get("net")) if isinstance(ckpt, dict) else None
    if state is None:
        raise CheckpointError(f"--pretrained {path} is not a policy checkpoint: no 'agent' "
                              f"(or 'net') entry")
    load_state_strict(agent, policy_state(state), path, "policy network")


def load_models(args: argparse.Namespace, spec: ModelSpec,
                resuming: bool) -> tuple[FlatResNet, PolicyNet, int]:
    """ResNet and policy as the authors' finetune.py set them up; returns the start epoch."""
    rnet, agent = build_resnet(spec), build_policy(spec)
    if resuming:  # last.t7 holds both networks
        return rnet, agent, 0
    ckpt = read_checkpoint(args.load) if args.load else None
    check_model_tag(ckpt, args.load, spec.name)
    if not (isinstance(ckpt, dict) and "resnet" in ckpt):
        load_default_base(rnet, spec, args.base_ckpt)
    if args.pretrained:
        load_pretrained_policy(agent, args.pretrained, spec.name)
    elif ckpt is None:
        init_policy(agent, spec, resolve_policy_init(spec, args.policy_init, False))
    if ckpt is None:
        return rnet, agent, 0
    loaded = load_blockdrop_checkpoint(args.load, rnet, agent, ckpt)
    if not loaded["agent"]:
        raise CheckpointError(f"{args.load} holds no policy network ('agent')")
    return rnet, agent, int(ckpt.get("epoch", -1)) + 1


def build_stage(args: argparse.Namespace, spec: ModelSpec,
                networks: tuple[FlatResNet, PolicyNet, int], test_loader: DataLoader,
                ctx: Context) -> Plan:
    """What finetuning trains: both networks, no curriculum."""
    rnet, agent, start_epoch = networks
    K = spec.num_blocks
    rnet.to(ctx.device)
    agent.to(ctx.device)
    ddp_rnet, ddp_agent = wrap(rnet, ctx.device, ctx.info), wrap(agent, ctx.device, ctx.info)
    optimizer = torch.optim.Adam(list(agent.parameters()) + list(rnet.parameters()),
                                 lr=args.lr, weight_decay=args.wd)

    def train_modes() -> None:
        ddp_rnet.train()
        ddp_agent.train()

    def step_for(epoch: int):
        def step(inputs, targets, indices):
            noise = keyed_uniform(args.seed, epoch, indices, K)
            return finetune_train_step(ddp_rnet, ddp_agent, inputs, targets, noise,
                                       alpha=args.alpha, penalty=args.penalty,
                                       world_size=ctx.info.world_size, amp=args.amp)
        return step

    def test(epoch: int):
        return evaluate_policy(rnet, agent, test_loader, ctx.device, args.penalty,
                               progress=not args.no_progress and ctx.info.is_main)

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            "agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": epoch,
            "reward": stats["reward"], "acc": stats["accuracy"], "model": spec.name}

    stage = Stage("finetune", {"agent": agent, "resnet": rnet}, optimizer, train_modes,
                  step_for, test, lambda e: lr_at(e, args.lr, args.lr_decay_ratio, args.epoch_step),
                  named_checkpoint)
    return Plan(stage, start_epoch, args.max_epochs + 1, lambda e: e % args.test_every == 0)


SCRIPT = Script(PROG, build_parser, load_models, build_stage)


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
