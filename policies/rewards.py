"""The equations of BlockDrop's policy learning (paper Sec. 3.2-3.3; docs/rewards.md).

Each function is one equation, on a whole batch at once. ``probs`` are the
policy's keep-probabilities s (B, K); a policy u is (B, K) of 0/1, u_k = 1
keeping block k.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def greedy_policy(probs: torch.Tensor) -> torch.Tensor:
    """Self-critical baseline policy: ũ_k = 1 if s_k >= 0.5 else 0 (Sec. 3.3)."""
    return (probs >= 0.5).to(probs.dtype)


def bounded_probs(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exploration bound (Sec. 3.3): s' = α·s + (1 − α)·(1 − s), so s' ∈ [1 − α, α]."""
    return probs * alpha + (1 - probs) * (1 - alpha)


def sample_policy(bprobs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u ~ Bernoulli(s') (Sec. 3.3): u_k = 1 where the uniform noise lies below s'_k.

    The noise is passed in so that a sample is reproducible per image
    (``utils.seeding.keyed_uniform``); ``noise = torch.rand_like(bprobs)`` is
    ordinary Bernoulli sampling.
    """
    return (noise.to(bprobs.device) < bprobs).to(bprobs.dtype)


def block_reward(policy: torch.Tensor, correct: torch.Tensor, penalty: float) -> torch.Tensor:
    """Eq. 3: R(u) = 1 − (|u|₀ / K)² if the prediction is correct, else −γ.

    ``penalty`` is the reward for a wrong prediction (the CLI's ``--penalty``,
    so γ = 10 is ``penalty = -10``). Returns (B,).
    """
    usage = policy.sum(1).to(torch.float32) / policy.shape[1]
    return torch.where(correct.bool(), 1.0 - usage ** 2, torch.full_like(usage, penalty))


def reward(preds: torch.Tensor, targets: torch.Tensor, policy: torch.Tensor,
           penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 from logits: ``(reward (B,), match (B,) as float)``."""
    match = preds.argmax(1) == targets
    return block_reward(policy, match, penalty), match.float()


def advantage(reward_sampled: torch.Tensor, reward_greedy: torch.Tensor) -> torch.Tensor:
    """Eq. 6 (self-critical): A = R(u) − R(ũ)."""
    return reward_sampled - reward_greedy


def curriculum_mask(batch: int, num_blocks: int, cl_step: int,
                    device: torch.device = None) -> torch.Tensor:
    """Curriculum mask (Alg. 1): 1 for the last ``cl_step`` blocks the policy decides,
    0 for the first ``K − cl_step`` blocks, which are forced to 1 and not learned."""
    mask = torch.zeros(batch, num_blocks, device=device)
    mask[:, num_blocks - min(cl_step, num_blocks):] = 1
    return mask


def curriculum_step(epoch: int, num_blocks: int) -> int:
    """Blocks decided by the policy at epoch e (from 0): ``min(e + 1, K)``."""
    return min(epoch + 1, num_blocks)


def apply_curriculum(policy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Force the blocks outside the curriculum (mask 0) to be kept."""
    return torch.where(mask.bool(), policy, torch.ones_like(policy))


def policy_log_prob(bprobs: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """log π(u) per block under Bernoulli(s'): u·log s' + (1 − u)·log(1 − s').

    A NaN probability (a diverged policy network) gives a NaN log-probability,
    so the loss is NaN and training takes its non-finite-loss stop;
    ``binary_cross_entropy`` itself would fail on it (a device assert on CUDA).
    """
    valid = (bprobs >= 0) & (bprobs <= 1)  # False for NaN
    log_prob = -F.binary_cross_entropy(torch.where(valid, bprobs, 0.5), policy, reduction="none")
    return torch.where(valid, log_prob, torch.nan)


def curriculum_loss(bprobs: torch.Tensor, policy: torch.Tensor, adv: torch.Tensor,
                    mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Curriculum-learning loss (Eq. 7 with the authors' entropy bonus):

    [Σ_{i,k} mask·(−log π(u_ik))·A_i − β·Σ_{i,k} (−s'_ik·log s'_ik)] / B,
    s' clamped to [1e-15, 1 − 1e-15] in the entropy term only.
    """
    pg = (mask * -policy_log_prob(bprobs, policy) * adv.view(-1, 1)).sum()
    s = bprobs.clamp(1e-15, 1 - 1e-15)
    entropy = (-s * torch.log(s)).sum()
    return (pg - beta * entropy) / bprobs.shape[0]


def finetune_loss(bprobs: torch.Tensor, policy: torch.Tensor, adv: torch.Tensor,
                  preds: torch.Tensor, targets: torch.Tensor,
                  sum_scale: float = 1.0) -> torch.Tensor:
    """Joint-finetuning loss: Σ_i (−Σ_k log π(u_ik))·A_i + mean_i CE(f(x_i; u_i), y_i).

    The first term is a sum over the (global) batch. With W data-parallel
    processes each holding 1/W of the batch, DDP averages their gradients, so
    each passes ``sum_scale = W`` to keep the sum; the mean term needs nothing.
    """
    pg = (-policy_log_prob(bprobs, policy).sum(1) * adv).sum()
    return sum_scale * pg + F.cross_entropy(preds, targets)


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard 0/1 decision ``probs >= threshold``; backward: the gradient of
    ``probs`` itself (the identity)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, threshold: float) -> torch.Tensor:
        return (probs >= threshold).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Straight-through estimator: exact 0/1 decisions forward (so the masked forward
    sees a valid policy), the probabilities' gradient backward."""
    return _StraightThrough.apply(probs, threshold)
