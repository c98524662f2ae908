"""Which networks a checkpoint holds, loaded for evaluation: the one recipe test.py,
the reproduction tools, the demo and the export share.

A checkpoint is evaluated under the method it records (``policies.registry``):
a learned method's agent (BlockDrop's policy network for the authors' files), or
the fixed policy a fixed-policy finetuning recorded; ``policy``/``k``/``seed``
override the record. A checkpoint without a ResNet is paired with the pretrained
base network (``base_ckpt`` or the model's default path).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from models import FlatResNet, ModelSpec, build_resnet
from policies.fixed import ceil_usage, check_k
from policies.method import Method
from policies.registry import (DEFAULT_METHOD, build_source, check_method, get_method,
                               method_names, method_of)
from policies.source import PolicySource, PolicySourceError
from utils.checkpoint import (CheckpointError, check_model_tag, load_blockdrop_checkpoint,
                              load_default_base, load_state_strict, read_checkpoint,
                              resnet_state)
from utils.stats import mean32


@dataclass(frozen=True)
class Request:
    """What to evaluate: the checkpoint and the flags that may override its record."""

    load: str | None = None
    base_ckpt: str | None = None
    policy: str | None = None  # a registered method name; None: the checkpoint's
    k: int | str | None = None  # a fixed policy's K, or "auto"
    seed: int | None = None
    threshold: float | None = None  # a learned method's keep threshold; None: its default


def _quiet(msg: str) -> None:
    pass


@dataclass
class Setup:
    """What test.py evaluates: the ResNet, the policy source and where they came from."""

    rnet: FlatResNet
    source: PolicySource
    base_ckpt: str | None  # the base ResNet file used, None when --load held the ResNet
    method: Method | None = None  # the method that decides
    agent: torch.nn.Module | None = None  # its deciding network, if any

    def at_threshold(self, spec: ModelSpec, threshold: float) -> PolicySource:
        """The same method and network with the keep threshold moved to ``threshold``."""
        return self.method.source(spec, self.agent, threshold=threshold)


def choose_policy(args: Request, ckpt: Any) -> dict[str, Any]:
    """``{method, k, seed}``: the flags, else what the checkpoint records, else the
    default method (a checkpoint without a record)."""
    recorded = method_of(ckpt, args.load or "the checkpoint")
    fixed = ckpt.get("fixed_policy") if isinstance(ckpt, dict) else None
    if args.policy is None and recorded is not None and not recorded.learned:
        return {"method": recorded, "k": args.k if args.k is not None else fixed["k"],
                "seed": args.seed if args.seed is not None else fixed.get("seed", 0)}
    if args.policy is not None:
        method = get_method(args.policy)
    else:
        method = recorded if recorded is not None else get_method(DEFAULT_METHOD)
    return {"method": method, "k": args.k, "seed": 0 if args.seed is None else args.seed}


def holds_resnet(ckpt: Any) -> bool:
    """A stage checkpoint with a ``resnet``, or a base-network file (pretraining's
    ``pk_E_*``: ``state_dict``) without a deciding network."""
    if not isinstance(ckpt, dict):
        return False
    if "resnet" in ckpt:
        return True
    return method_of(ckpt) is None and any(isinstance(ckpt.get(k), dict)
                                           for k in ("state_dict", "model"))


def load_resnet(spec: ModelSpec, ckpt: Any, args: Request, log: Callable[[str], None],
                say: Callable[[str], None] = _quiet) -> tuple[FlatResNet, str | None]:
    """The ResNet of ``--load`` if it holds one (a finetuned stage checkpoint or a
    pretraining checkpoint), else the pretrained base network."""
    rnet = build_resnet(spec)
    if holds_resnet(ckpt):
        load_state_strict(rnet, resnet_state(ckpt), args.load, "ResNet")
        say(f"loaded resnet from {os.path.basename(args.load)}")
        return rnet, None
    base = load_default_base(rnet, spec, args.base_ckpt, policy_only=ckpt is not None)
    log(f"loaded base resnet from {base}")
    return rnet, base


def auto_k(spec: ModelSpec, ckpt: Any, path: str | None, loader: DataLoader,
           device: torch.device, log: Callable[[str], None]) -> int:
    """``--k auto``: the mean block usage of the one-shot learned policy in ``path`` on
    the test set, rounded up (the paper's K for the baselines)."""
    method = method_of(ckpt, path or "")
    source = None
    if method is not None and method.learned:
        agent = method.build(spec)
        load_blockdrop_checkpoint(path, None, agent,
                                  {"agent": ckpt.get("agent", ckpt.get("net"))})
        source = build_source(method.name, spec, agent=agent).to(device).eval()
    if source is None or not source.one_shot:
        held = (f"{path} holds no one-shot learned policy" if path else "no --load was given")
        raise PolicySourceError(f"--k auto needs a BlockDrop checkpoint in --load ({held}); "
                                f"or give --k between 1 and {spec.num_blocks}")
    with torch.no_grad():
        usage = torch.cat([source(x.to(device)).sum(1).cpu() for x, _ in loader])
    mean = mean32(usage.numpy())
    k = ceil_usage(mean)
    log(f"--k auto: mean block usage {mean:.3f} of {os.path.basename(path)} -> K = {k}")
    return k


def setup_fixed(spec: ModelSpec, ckpt: Any, choice: dict[str, Any], args: Request,
                loader: DataLoader | None, device: torch.device, log, say=_quiet) -> Setup:
    """A fixed policy on the ResNet of ``--load`` or the base network."""
    k = choice["k"]
    if k is None:
        raise PolicySourceError(f"--policy {choice['method'].name} needs --k: an integer "
                                f"between 1 and {spec.num_blocks}, or auto")
    if k == "auto":
        k = auto_k(spec, ckpt, args.load, loader, device, log)
    check_k(k, spec.num_blocks, spec.name)
    rnet, base = load_resnet(spec, ckpt, args, log, say)
    source = choice["method"].source(spec, k=k, seed=choice["seed"])
    return Setup(rnet, source, base, choice["method"])


def setup_learned(spec: ModelSpec, ckpt: Any, method: Method, args: Request, log,
                  say=_quiet) -> Setup:
    """The deciding network of ``--load`` (BlockDrop's policy network, BlockDrop-seq's
    gates, ...)."""
    fixed = ", ".join(method_names(learned=False))
    if args.k is not None:
        raise PolicySourceError(f"--k applies to the fixed policies ({fixed}), not to "
                                f"{method.name}")
    if ckpt is not None:
        check_method(ckpt, args.load, method.name, flag="--policy")
        if method_of(ckpt, args.load) is None:
            raise CheckpointError(
                f"{args.load} holds no agent; evaluate its ResNet under a fixed policy "
                f"({fixed}), e.g. test.py --model {spec.name} --load {args.load} "
                f"--policy firstk --k {spec.num_blocks}")
    agent = method.build(spec)
    if ckpt is None:
        if not hasattr(agent, "keep_all"):
            raise PolicySourceError(f"--policy {method.name} needs --load with a "
                                    f"{method.name} checkpoint")
        agent.keep_all()  # the authors' test.py without --load: every block, policy counted
    rnet, base = load_resnet(spec, ckpt, args, log, say)
    if ckpt is not None:
        load_blockdrop_checkpoint(args.load, None, agent,
                                  {k: v for k, v in ckpt.items() if k != "resnet"})
        say(f"loaded agent from {os.path.basename(args.load)}")
    return Setup(rnet, method.source(spec, agent, threshold=args.threshold), base, method, agent)


def load_for_eval(spec: ModelSpec, request: Request, loader: DataLoader | None = None,
                  device: torch.device | str = "cpu", log: Callable[[str], None] = _quiet,
                  say: Callable[[str], None] = _quiet) -> Setup:
    """The ResNet and the policy source to evaluate ``request`` with (``loader`` and
    ``device`` serve ``k="auto"`` only). ``say`` gets the lines the authors' test.py
    printed ("loaded resnet from ...", "loaded agent from ..."), ``log`` the others."""
    ckpt = read_checkpoint(request.load) if request.load else None
    check_model_tag(ckpt, request.load, spec.name)
    choice = choose_policy(request, ckpt)
    if request.threshold is not None and not choice["method"].threshold_help:
        raise PolicySourceError(f"--threshold applies to learned methods with a keep "
                                f"threshold; {choice['method'].name} has none")
    if choice["method"].learned:
        return setup_learned(spec, ckpt, choice["method"], request, log, say)
    return setup_fixed(spec, ckpt, choice, request, loader, torch.device(device), log, say)
