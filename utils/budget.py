"""Operating points from one checkpoint: the keep threshold that meets a FLOP budget.

A learned method decides with a keep threshold (``policies``: each method's
``threshold_help`` says what it means for it). Moving it trades accuracy for
FLOPs without retraining. :func:`threshold_for_budget` finds the threshold whose
mean FLOPs per image on a held-out split of the training set (test-time
transforms, a seeded draw) comes closest to a budget: FLOPs move monotonically
with the threshold, so the search bisects between the two ends of the range.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models import FlatResNet, ModelSpec
from models.flops import flop_table
from policies.source import PolicySource, PolicySourceError
from utils.data import get_dataset, get_transform
from utils.engine import evaluate

STEPS = 12  # bisection steps: the threshold is found to 2**-12 of its range


class BudgetError(PolicySourceError):
    """A FLOP budget the method cannot reach, or a bad budget request."""


def held_out_split(spec: ModelSpec, data_dir: str, images: int, seed: int) -> Dataset:
    """``images`` training images drawn with ``seed``, under the test-time transforms."""
    trainset = get_dataset(spec, data_dir, train=True)
    trainset.transform = get_transform(spec, train=False)
    count = min(images, len(trainset))
    order = torch.randperm(len(trainset), generator=torch.Generator().manual_seed(seed))
    return Subset(trainset, order[:count].tolist())


@dataclass(frozen=True)
class BudgetChoice:
    threshold: float
    held_out_flops: float  # mean FLOPs per image at that threshold on the held-out split
    reachable: tuple[float, float]  # mean FLOPs at the cheapest and the dearest threshold
    images: int
    seed: int


def threshold_for_budget(rnet: FlatResNet, source_at: Callable[[float], PolicySource],
                         spec: ModelSpec, loader: DataLoader, device: torch.device,
                         budget: float, low: float = 0.0, high: float = 1.0,
                         steps: int = STEPS, seed: int = 0) -> BudgetChoice:
    """Bisect the threshold in ``[low, high]`` for mean FLOPs closest to ``budget``.

    ``source_at(T)`` is the method's source with threshold T. A budget outside the
    FLOPs the two ends reach is refused, naming the reachable range."""
    table = flop_table(spec.name)
    cache: dict[float, float] = {}

    def flops(t: float) -> float:
        if t not in cache:
            result = evaluate(rnet, source_at(t), loader, device, flops=table, progress=False)
            cache[t] = float(result.flops.mean())
        return cache[t]

    ends = sorted((flops(low), flops(high)))
    if not ends[0] <= budget <= ends[1]:
        raise BudgetError(f"--budget {budget:.3E} FLOPs is out of reach: thresholds in "
                          f"[{low}, {high}] give {ends[0]:.3E} to {ends[1]:.3E} FLOPs per image "
                          f"on the held-out images")
    rising = flops(high) >= flops(low)
    a, b = low, high
    for _ in range(steps):
        mid = (a + b) / 2
        if (flops(mid) < budget) == rising:
            a = mid
        else:
            b = mid
    best = min(cache, key=lambda t: (abs(cache[t] - budget), t))
    return BudgetChoice(best, cache[best], (ends[0], ends[1]), len(loader.dataset), seed)
