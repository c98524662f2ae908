"""The statistics that test.py and the training logs print (docs/evaluation.md).

The authors computed them with PyTorch 0.3 on float32 CUDA tensors: a mean is
the float32 quotient of an exact sum, a standard deviation the float32 result
of a two-pass sample variance. Reproducing that rounding matters: with 10,000
test images a mean such as 16.9335 lies exactly on a rounding boundary, and
float32 prints ``16.934`` where float64 prints ``16.933``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def mean32(values: np.ndarray) -> float:
    """The float32 mean of exactly summable values (0/1 matches, block counts)."""
    total = np.float64(values.sum())
    return float(np.float32(total) / np.float32(values.size))


def std32(values: np.ndarray) -> float:
    """Sample standard deviation (N-1) around the float32 mean, rounded to float32."""
    if values.size < 2:
        return float("nan")
    mean = np.float64(mean32(values))
    var = ((values.astype(np.float64) - mean) ** 2).sum() / (values.size - 1)
    return float(np.float32(np.sqrt(var)))


@dataclass
class PolicyStats:
    accuracy: float
    reward: float
    block_usage: float  # mean kept blocks per image ("sparsity" in the authors' logs)
    block_usage_std: float  # its sample std ("variance" in the authors' logs)
    unique_policies: int


def policy_stats(policies: torch.Tensor, matches: torch.Tensor,
                 rewards: torch.Tensor = None) -> PolicyStats:
    """Accuracy, mean reward, block usage (mean, sample std) and distinct policies.

    ``policies`` is (N, K) of 0/1, ``matches`` (N,) of 0/1, ``rewards`` (N,) or None.
    """
    pol = policies.detach().to("cpu", torch.uint8)
    usage = pol.sum(1).numpy().astype(np.int64)
    match = matches.detach().cpu().reshape(-1).double().numpy()
    reward = float("nan")
    if rewards is not None:
        reward = float(np.float32(rewards.detach().cpu().double().mean().item()))
    unique = int(torch.unique(pol, dim=0).shape[0]) if pol.numel() else 0
    return PolicyStats(mean32(match), reward, mean32(usage), std32(usage), unique)


def format_eval_block(stats: PolicyStats, flops: Sequence[int]) -> str:
    """The block the authors' test.py printed: FLOPs mean and population std."""
    flops = np.asarray(flops, dtype=np.float64)
    return ("\n    Accuracy: %.3f\n    Block Usage: %.3f \u00B1 %.3f\n"
            "    FLOPs/img: %.2E \u00B1 %.2E\n    Unique Policies: %d\n    "
            % (stats.accuracy, stats.block_usage, stats.block_usage_std,
               np.mean(flops), np.std(flops), stats.unique_policies))
