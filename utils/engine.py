"""The loops shared by every entry point (STYLE: one engine).

``evaluate`` is the greedy-policy evaluation of test.py and of the training
scripts' periodic test (paper Sec. 4, SPEC sections 4-5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
from tqdm import tqdm

from models import FlatResNet, PolicyNet
from utils.flops import FlopTable
from utils.rewards import apply_curriculum, curriculum_mask, greedy_policy, reward
from utils.stats import PolicyStats, policy_stats


@dataclass
class EvalResult:
    policies: torch.Tensor  # (N, K) uint8, the greedy policy of every image
    matches: torch.Tensor  # (N,) float, 1 where the prediction is right
    rewards: Optional[torch.Tensor]  # (N,) Eq. 3 rewards, when a penalty was given
    flops: Optional[np.ndarray]  # (N,) int64 FLOPs per image, policy network included
    stats: PolicyStats


@torch.no_grad()
def evaluate(rnet: FlatResNet, agent: PolicyNet, loader: Iterable, device: torch.device,
             flops: Optional[FlopTable] = None, penalty: Optional[float] = None,
             cl_step: Optional[int] = None, dynamic: bool = True, progress: bool = True,
             desc: str = "test") -> EvalResult:
    """Run the greedy policy over ``loader`` and collect the paper's statistics.

    ``cl_step``: during curriculum learning only the last ``cl_step`` blocks are
    decided, the others kept. ``dynamic`` runs each block only on the images that
    keep it (``forward_dynamic``); ``False`` uses the masked ``forward``.
    """
    rnet.eval()
    agent.eval()
    policies, matches, rewards = [], [], []
    for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        probs, _ = agent(inputs)
        policy = greedy_policy(probs)
        if cl_step is not None:
            policy = apply_curriculum(
                policy, curriculum_mask(len(inputs), policy.shape[1], cl_step, device))
        preds = rnet.forward_dynamic(inputs, policy) if dynamic else rnet(inputs, policy)
        match = (preds.argmax(1) == targets).float()
        if penalty is not None:
            rewards.append(reward(preds, targets, policy, penalty)[0].cpu())
        policies.append(policy.to(torch.uint8).cpu())
        matches.append(match.cpu())
    pol = torch.cat(policies)
    mat = torch.cat(matches)
    rew = torch.cat(rewards) if rewards else None
    per_image = flops.per_image(pol).numpy() if flops is not None else None
    return EvalResult(pol, mat, rew, per_image, policy_stats(pol, mat, rew))
