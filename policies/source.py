"""Policy sources: where the (B, K) keep/drop decisions of a batch come from.

A source maps a batch of images to a (B, K) 0/1 policy (1 keeps a block) and
knows what deciding costs per image (``policy_flops``). Evaluation, test.py,
finetuning and the benchmark take a source, so they need not know which method
decides. A *one-shot* source decides from the image alone (``__call__``); every
source can ``run`` the ResNet under its decisions, which is how a method that
decides while the network runs (BlockDrop-seq's gates) plugs in.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from models import FlatResNet
from models.fast import DEFAULT, FastOptions, inference_copy
from utils.errors import UserError


class PolicySourceError(UserError, ValueError):
    """A method or policy was asked for with a bad name, K, option or network."""


class PolicySource:
    """Decisions for a batch. ``one_shot`` sources decide from the image alone
    (``__call__``); every source can ``run`` the ResNet under its decisions."""

    name: str
    k: int | None = None  # blocks kept by a fixed policy; None for learned ones
    policy_flops: int = 0  # per image
    one_shot: bool = True
    agent: nn.Module | None = None  # the network that decides, if any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decision_flops(self, policy: torch.Tensor) -> torch.Tensor | int:
        """FLOPs of deciding, per image, for the (N, K) policies taken: ``policy_flops`` for
        every image unless the deciding work depends on the path (ACT's halting units)."""
        return self.policy_flops

    def eval(self) -> PolicySource:
        """Put the source's network, if any, in eval mode."""
        if self.agent is not None:
            self.agent.eval()
        return self

    def to(self, device: torch.device) -> PolicySource:
        if self.agent is not None:
            self.agent.to(device)
        return self

    def for_inference(self, options: FastOptions = DEFAULT,
                      device: torch.device | None = None) -> PolicySource:
        """This source with an inference copy of its deciding network (models.fast);
        the source itself is left untouched."""
        if self.agent is None:
            return self
        fast = copy.copy(self)
        fast.agent = inference_copy(self.agent, options, device)
        return fast

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, policy)`` of ``rnet`` on ``x`` under this source's decisions.

        ``dynamic`` runs each block only for the images that keep it; ``False`` runs
        the masked forward. ``keep_first`` forces the first blocks to be kept (the
        curriculum of Alg. 1)."""
        policy = self(x)
        if keep_first:
            policy = policy.clone()
            policy[:, :keep_first] = 1
        if not dynamic:
            return rnet(x, policy), policy
        return rnet.forward_dynamic(x, policy), policy


def check_pass(mode: str, modes: tuple[str, ...], decides: int | None = None,
               rnet: FlatResNet | None = None) -> None:
    """The arguments of a method's pass: ``mode`` one of ``modes``; a deciding network for
    ``decides`` blocks beside a ResNet of as many."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {', '.join(modes)}, got {mode!r}")
    if rnet is not None and decides != rnet.num_blocks:
        raise ValueError(f"the deciding network decides {decides} blocks, the ResNet has "
                         f"{rnet.num_blocks}")
