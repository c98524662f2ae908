"""The fixed heuristics of Table 1: FirstK, RandomK and DistributeK (paper Sec. 4.1).

Each keeps the same K blocks for every image and runs no network
(``policy_flops = 0``). A heuristic is a function ``(layers, k, seed) -> kept
block indices`` in :data:`FIXED_RULES`; each is registered as a method, which
finetuning can train the ResNet under (Table 1's "ft" columns: the ResNet alone,
cross-entropy, the dropped blocks frozen). A stage checkpoint records the rule as
``fixed_policy: {name, k, seed}``.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FlatResNet, ModelSpec
from models.export import FixedDecision
from utils.amp import autocast
from utils.dist import wrap

from .method import FINETUNE, Method, StepOutput, TrainStep, Where, register
from .source import PolicySource, PolicySourceError


def firstk_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """FirstK: keep blocks 0..K-1 (the first K in forward order)."""
    return list(range(k))


def randomk_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """RandomK: K distinct blocks drawn once, uniformly, by ``torch.randperm`` on a
    generator seeded with ``seed``; every image keeps the same set."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(sum(layers), generator=generator)[:k].tolist())


def stage_quotas(layers: Sequence[int], k: int) -> list[int]:
    """How many of K blocks each block stage keeps under DistributeK: one block at a time
    to the block stages in order (first, second, ..., last, first, ...), skipping one
    once all its blocks are kept. Equal block stages thus get floor(K/S) or ceil(K/S)
    blocks, the earlier ones taking the remainder."""
    quotas = [0] * len(layers)
    while sum(quotas) < k:
        for s, count in enumerate(layers):
            if quotas[s] < count and sum(quotas) < k:
                quotas[s] += 1
    return quotas


def distributek_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """DistributeK: K blocks spread as evenly as possible over the block stages, then
    evenly inside each.

    Rule: block stage s keeps ``m_s`` blocks from :func:`stage_quotas`; inside a block
    stage of ``n`` blocks the kept ones are ``floor(j * n / m_s)`` for ``j = 0..m_s-1``,
    so its first block (the one that changes resolution) is always among them and the
    rest are evenly spaced. E.g. R110 (18,18,18), K=17: quotas 6,6,5; blocks
    0,3,6,9,12,15 | 0,3,6,9,12,15 | 0,3,7,10,14.
    """
    kept, offset = [], 0
    for count, m in zip(layers, stage_quotas(layers, k), strict=True):
        kept += [offset + (j * count) // m for j in range(m)]
        offset += count
    return kept


def every_other_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """EveryOther: blocks 0, 2, 4, ... (the static pattern used with LayerDrop), then
    1, 3, 5, ... once the even ones are taken, until K blocks are kept."""
    order = list(range(0, sum(layers), 2)) + list(range(1, sum(layers), 2))
    return sorted(order[:k])


FIXED_RULES: dict[str, Callable[[Sequence[int], int, int], list[int]]] = {
    "firstk": firstk_blocks,
    "randomk": randomk_blocks,
    "distributek": distributek_blocks,
    "everyother": every_other_blocks,
}


def check_k(k: object, num_blocks: int, model: str = "") -> int:
    """``k`` as an int in 1..K, or PolicySourceError naming the valid range."""
    of = f" of {model}" if model else ""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_blocks:
        raise PolicySourceError(f"--k must be an integer between 1 and {num_blocks} "
                                f"(the blocks{of}), got {k!r}")
    return k


def fixed_vector(name: str, layers: Sequence[int], k: int, seed: int = 0) -> torch.Tensor:
    """The (K,) float 0/1 keep vector of the fixed rule ``name``."""
    num_blocks = sum(layers)
    check_k(k, num_blocks)
    vector = torch.zeros(num_blocks)
    vector[FIXED_RULES[name](layers, k, seed)] = 1.0
    return vector


def ceil_usage(mean_usage: float) -> int:
    """K as the paper sets it for the baselines: BlockDrop's mean block usage rounded up."""
    return max(1, math.ceil(round(mean_usage, 6)))


class FixedSource(PolicySource):
    """The same keep vector for every image; no network runs, no FLOPs."""

    def __init__(self, name: str, vector: torch.Tensor, seed: int = 0):
        self.name = name
        self.vector = vector.float()
        self.k = int(self.vector.sum())
        self.seed = seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.vector.to(x.device).expand(x.shape[0], -1).clone()

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not dynamic or keep_first:
            return super().run(rnet, x, dynamic, keep_first)
        return rnet.forward_single(x, self.vector), self(x)


def fixed_policy_train_step(rnet: nn.Module, vector: torch.Tensor, inputs: torch.Tensor,
                            targets: torch.Tensor, amp: str = "none") -> StepOutput:
    """Finetuning the ResNet alone under a fixed policy (Table 1's "ft"): cross-entropy
    of the masked forward with the same (K,) keep vector for every image."""
    policy = vector.to(inputs.device).expand(inputs.shape[0], -1)
    with autocast(amp, inputs.device):
        preds = rnet(inputs, policy)
    loss = F.cross_entropy(preds.float(), targets)
    return StepOutput(loss, (preds.argmax(1) == targets).float())


class FixedRule(Method):
    """A fixed heuristic as a method: no deciding network; finetuning trains the ResNet
    alone under its keep vector (``--policy NAME --k K``)."""

    learned = False
    stages = (FINETUNE,)

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.seeded = name == "randomk"
        self.summary = (FIXED_RULES[name].__doc__ or "").split("\n")[0]

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        if threshold is not None:
            raise PolicySourceError(f"--threshold applies to learned methods; the fixed policy "
                                    f"{self.name} has no keep probabilities")
        check_k(k, spec.num_blocks, spec.name)
        return FixedSource(self.name, fixed_vector(self.name, spec.layers, k, seed), seed)

    def trained_modules(self, stage: str, rnet: FlatResNet,
                        agent: nn.Module | None) -> dict[str, nn.Module]:
        return {"resnet": rnet}

    def prepare(self, stage: str, rnet: FlatResNet, agent: nn.Module | None,
                args: argparse.Namespace, spec: ModelSpec) -> None:
        """The dropped blocks never run, so they are frozen (and left out of DDP and Adam)."""
        vector = fixed_vector(self.name, spec.layers, args.k, args.seed)
        for t, kept in enumerate(vector.tolist()):
            rnet.block(t).requires_grad_(bool(kept))

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        ddp_rnet = wrap(rnet, where.device, where.info)
        vector = fixed_vector(self.name, rnet.layers, args.k, args.seed)

        def step(inputs, targets, noise, cl_step):
            return fixed_policy_train_step(ddp_rnet, vector, inputs, targets, amp=args.amp)
        return ddp_rnet, step

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        """The static sub-network: the dropped blocks are absent from the graph."""
        return FixedDecision(source.name, source.vector)

    def record(self, source: PolicySource) -> dict[str, Any]:
        return {"fixed_policy": {"name": source.name, "k": source.k, "seed": source.seed}}


for _name in FIXED_RULES:
    register(FixedRule(_name))
