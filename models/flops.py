"""FLOP accounting (paper footnote 3; docs/flops.md).

Conv2d and Linear layers only, 2 FLOPs per multiply-accumulate: a conv costs
``2*C_in*C_out*k_h*k_w*H_out*W_out`` (per group), a linear ``2*in*out``. Every
model gets a table: a fixed cost (stem, stage shortcuts, which run even when a
stage's first block is dropped, classifier, and the whole policy network) and
one cost per residual block, so that for a whole batch of policies

    flops(policy) = fixed + policy @ block_costs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn as nn

from . import build_policy, build_resnet
from .backbone import Backbone
from .specs import get_spec


def _layer_cost(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = 2 * (module.in_channels // module.groups) * kh * kw
        return per_out * module.out_channels * out.shape[-2] * out.shape[-1]
    return 2 * module.in_features * module.out_features


@contextlib.contextmanager
def flop_counter(module: nn.Module) -> Iterator[dict[str, int]]:
    """While open, count the FLOPs of each Conv2d/Linear of ``module`` (by name) into
    the yielded dict, with forward hooks (the authors counted inside their layers)."""
    names = {m: n for n, m in module.named_modules()}
    costs: dict[str, int] = {}

    def count(m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        costs[names[m]] = costs.get(names[m], 0) + _layer_cost(m, out)

    hooks = [m.register_forward_hook(count)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        yield costs
    finally:
        for h in hooks:
            h.remove()


def module_flops(run, module: nn.Module) -> dict[str, int]:
    """FLOPs of each Conv2d/Linear of ``module`` (by name) during ``run()`` on one image."""
    with flop_counter(module) as costs, torch.no_grad():
        run()
    return costs


@dataclass(frozen=True)
class FlopTable:
    """Per-image FLOPs of a BlockDrop model: ``fixed + policy @ block_costs``."""

    resnet_fixed: int  # stem, shortcuts, classifier
    block_costs: tuple[int, ...]  # one entry per residual block
    policy: int  # the policy network, both heads included

    @property
    def full_resnet(self) -> int:
        """The base ResNet with every block kept, without the policy network."""
        return self.resnet_fixed + sum(self.block_costs)

    def per_image(self, policy: torch.Tensor, include_policy: bool = True) -> torch.Tensor:
        """FLOPs of each image (int64, shape (B,)) for a (B, K) batch of 0/1 policies."""
        costs = torch.tensor(self.block_costs, dtype=torch.int64, device=policy.device)
        fixed = self.resnet_fixed + (self.policy if include_policy else 0)
        return fixed + policy.to(torch.int64) @ costs


def backbone_costs(net: Backbone, image_size: int) -> tuple[int, tuple[int, ...]]:
    """``(fixed, block_costs)`` of a backbone on one image, through its interface: what
    runs inside ``run_block(t)`` is block t's; the stem, the residual paths (stage
    shortcuts) and the head are fixed."""
    x = torch.zeros(1, 3, image_size, image_size)
    with flop_counter(net) as costs, torch.no_grad():
        h = net.stem(x)
        fixed = sum(costs.values())
        blocks = []
        for t in range(net.num_blocks):
            before = sum(costs.values())
            residual = net.residual(t, h)
            fixed += sum(costs.values()) - before
            before = sum(costs.values())
            h = net.run_block(t, h, residual)
            blocks.append(sum(costs.values()) - before)
        before = sum(costs.values())
        net.head(h)
        fixed += sum(costs.values()) - before
    return fixed, tuple(blocks)


@cache
def flop_table(model_name: str) -> FlopTable:
    """The FlopTable of a registered model, measured once on a single image."""
    spec = get_spec(model_name)
    with torch.random.fork_rng(devices=[]):  # measuring must not move the global generator
        rnet = build_resnet(spec).eval()
        agent = build_policy(spec).eval()
    fixed, blocks = backbone_costs(rnet, spec.image_size)
    x = torch.zeros(1, 3, spec.image_size, spec.image_size)
    policy = sum(module_flops(lambda: agent(x), agent).values())
    return FlopTable(fixed, blocks, policy)
