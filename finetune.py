"""Joint finetuning of the policy and the ResNet (paper Sec. 3.3; docs/rewards.md).

Both networks train with Adam, the ResNet in train mode; no curriculum, no
entropy term. Loss per batch: Σ_i (−Σ_k log π(u_ik))·A_i + mean cross-entropy
of the ResNet under the sampled policy, whose forward pass carries the
gradient (the greedy pass does not). The authors' command line works, e.g.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 \\
        --pretrained cv/cl_training/R110_C10/ckpt_E_5300_A_0.754_R_2.22E-01_S_20.10_#_7787.t7 \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/

``--agent NAME`` finetunes another registered learned method with the ResNet
(``seq``: BlockDrop-seq's gates). ``--policy firstk|randomk|distributek|... --k K``
trains the ResNet alone with cross-entropy under that fixed policy (Table 1's
"ft" columns; docs/policies.md).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import FlatResNet, ModelSpec, build_resnet
from policies.method import FINETUNE
from policies.registry import build_source, check_method, chosen_method
from utils.checkpoint import (CheckpointError, check_model_tag, load_blockdrop_checkpoint,
                              load_default_base, load_state_strict, policy_state,
                              read_checkpoint, torchvision_to_flat)
from utils.config import (add_authors_args, add_fast_flags, add_method_args, add_run_args,
                          fast_options, make_parser, method_problems)
from utils.engine import Stage, authors_lr_schedule, evaluate_policy
from utils.optim import make_adam
from utils.launch import Context, Plan, Script, is_rank0, launch, test_every
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
    p.add_argument("--agent_lr_scale", type=float, default=1.0,
                   help="the agent (policy network, gates, halting units) trains at this "
                        "multiple of --lr, the ResNet at --lr; 1 (default): one rate for "
                        "both, as the authors' finetune.py")
    add_run_args(p)
    add_method_args(p, fixed_policies=True)
    add_fast_flags(p)
    return p


def load_pretrained_policy(agent: torch.nn.Module, path: str, name: str,
                           agent_type: str) -> None:
    """``--pretrained``: the agent of a curriculum checkpoint (``agent`` or old ``net``)."""
    ckpt = read_checkpoint(path)
    check_model_tag(ckpt, path, name)
    check_method(ckpt, path, agent_type)
    state = ckpt.get("agent", ckpt.get("net")) if isinstance(ckpt, dict) else None
    if state is None:
        raise CheckpointError(f"--pretrained {path} is not a policy checkpoint: no 'agent' "
                              f"(or 'net') entry")
    load_state_strict(agent, policy_state(state), path, "policy network")
    if is_rank0():
        print("loaded pretrained model from", path)  # the authors' line


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
    method = chosen_method(args)
    if not method.learned:  # a fixed policy or a regime that trains the ResNet alone
        return load_resnet_only(args, spec, resuming)
    rnet, agent = build_resnet(spec), method.build(spec)
    if resuming:  # last.t7 holds both networks
        return rnet, agent, 0
    ckpt = read_checkpoint(args.load) if args.load else None
    check_model_tag(ckpt, args.load, spec.name)
    check_method(ckpt, args.load, args.agent)
    if not (isinstance(ckpt, dict) and "resnet" in ckpt):
        load_default_base(rnet, spec, args.base_ckpt)
    if args.pretrained:
        load_pretrained_policy(agent, args.pretrained, spec.name, args.agent)
    elif ckpt is None:
        method.initialise(agent, spec, args, FINETUNE)
    if ckpt is None:
        return rnet, agent, 0
    loaded = load_blockdrop_checkpoint(args.load, rnet, agent, ckpt)
    if not loaded["agent"]:
        raise CheckpointError(f"{args.load} holds no policy network ('agent')")
    if is_rank0():
        print("loaded agent from", args.load)
    return rnet, agent, int(ckpt.get("epoch", -1)) + 1


def param_groups(modules: dict[str, nn.Module], agent_scale: float) -> list[dict]:
    """The trained parameters as optimizer groups: one group (the authors' optimizer) unless
    the agent has its own rate, ``agent_scale`` x the ResNet's (``lr_scale``, which
    ``utils.engine.set_lr`` applies at every epoch)."""
    def trainable(keys):
        return [p for k in keys for p in modules[k].parameters() if p.requires_grad]
    if agent_scale == 1.0 or "agent" not in modules:
        return [{"params": trainable(modules)}]
    others = [k for k in modules if k != "agent"]
    return [{"params": trainable(others)},
            {"params": trainable(["agent"]), "lr_scale": agent_scale}]


def finetune_problems(args: argparse.Namespace) -> list[str]:
    """The method's checks, and an agent rate that is a positive number."""
    problems = method_problems(args)
    scale = args.agent_lr_scale
    if not (0 < scale < float("inf")):
        problems.append(f"--agent_lr_scale must be a finite number > 0, got {scale}")
    elif scale != 1.0 and not chosen_method(args).learned:
        problems.append("--agent_lr_scale applies to a learned --agent; a fixed --policy or "
                        "--stochastic_depth trains the ResNet alone")
    return problems


def build_stage(args: argparse.Namespace, spec: ModelSpec,
                networks: tuple[FlatResNet, nn.Module | None, int], test_loader: DataLoader,
                ctx: Context) -> Plan:
    """What finetuning trains: the method's networks, no curriculum. A learned method
    trains its agent and the ResNet; a fixed ``--policy`` the ResNet alone (its dropped
    blocks frozen, so they are left out of DDP and Adam)."""
    rnet, agent, start_epoch = networks
    method = chosen_method(args)
    K = spec.num_blocks
    method.prepare(FINETUNE, rnet, agent, args, spec)
    modules = method.trained_modules(FINETUNE, rnet, agent)
    for module in modules.values():
        module.to(ctx.device)
    trained, train_step = method.train_step(FINETUNE, args, rnet, agent, ctx)
    source = build_source(method.name, spec, agent=agent, k=args.k, seed=args.seed)
    optimizer = make_adam(param_groups(modules, args.agent_lr_scale), args.lr, args.wd,
                          args.adam_legacy_eps)

    def step_for(epoch: int):
        def step(inputs, targets, indices):
            return train_step(inputs, targets, keyed_uniform(args.seed, epoch, indices, K), K)
        return step

    def test(epoch: int):
        return evaluate_policy(rnet, source, test_loader, ctx.device, args.penalty,
                               progress=not args.no_progress and ctx.info.is_main,
                               fast=fast_options(args))

    def named_checkpoint(epoch: int, stats):
        return blockdrop_name(epoch, stats), {
            **{key: m.state_dict() for key, m in modules.items()}, "epoch": epoch,
            "reward": stats["reward"], "acc": stats["accuracy"], "model": spec.name,
            **method.record(source)}

    # a fixed policy's stage keeps its own name in last.t7 (it holds the ResNet alone)
    stage = Stage(name=FINETUNE if method.learned else "finetune_fixed", modules=modules,
                  optimizer=optimizer, train_modes=trained.train, step_for=step_for, test=test,
                  lr_for=authors_lr_schedule(args.lr, args.lr_decay_ratio, args.epoch_step,
                                             tqdm.write if ctx.info.is_main else None),
                  named_checkpoint=named_checkpoint)
    return Plan(stage, start_epoch, args.max_epochs + 1, test_every(args.test_every))


SCRIPT = Script(PROG, build_parser, load_models, build_stage, checks=finetune_problems,
                kept_on_resume=("agent", "policy", "k", "seed", "stochastic_depth",
                                "agent_lr_scale"))


def main(argv: Sequence[str] | None = None) -> None:
    launch(SCRIPT, argv)


if __name__ == "__main__":
    main()
