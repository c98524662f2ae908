"""BlockDrop: a policy network decides in one shot which blocks run (paper Sec. 3).

The deciding network is the spec's policy network (:class:`models.PolicyNet`:
ResNet-8 on CIFAR, ResNet-10 on ImageNet) giving keep-probabilities s (B, K).
At test time block k is kept iff ``s_k >= 0.5`` (the greedy policy); its FLOPs
count per image. Training (Sec. 3.3, Alg. 1) samples u ~ Bernoulli(s') with the
bounded s' and takes the greedy policy as the self-critical baseline:

* ``cl`` (curriculum learning): the ResNet is frozen; at epoch e only the last
  ``min(e + 1, K)`` blocks are decided, the loss is Eq. 7 with an entropy bonus;
* ``finetune``: the policy and the ResNet train together; the sampled pass
  carries the cross-entropy gradient into the ResNet.

The equations themselves are the pure functions of :mod:`policies.rewards`.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from models import FlatResNet, ModelSpec, PolicyNet, build_policy
from models.export import PolicyNetDecision
from models.flops import flop_table
from utils.amp import autocast
from utils.checkpoint import init_policy
from utils.dist import wrap

from .method import CURRICULUM, FINETUNE, Method, StepOutput, TrainStep, Where, register
from .policy_init import resolve_policy_init
from .rewards import (advantage, apply_curriculum, bounded_probs, curriculum_loss,
                      curriculum_mask, finetune_loss, greedy_policy, reward, sample_policy)
from .source import PolicySource

GREEDY = 0.5  # keep iff s_k >= 0.5 (Sec. 3.3)


class AgentSource(PolicySource):
    """BlockDrop: the policy of a one-shot policy network, block k kept iff
    ``s_k >= threshold`` (0.5: the greedy policy of Sec. 3.3)."""

    name = "blockdrop"

    def __init__(self, agent: nn.Module, policy_flops: int, threshold: float = GREEDY):
        self.agent = agent
        self.policy_flops = policy_flops
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.agent(x)
        if self.threshold == GREEDY:
            return greedy_policy(probs)
        return (probs >= self.threshold).to(probs.dtype)


# -- training steps (Sec. 3.3, Alg. 1) ------------------------------------------
def policy_pass(agent: nn.Module, inputs: torch.Tensor, alpha: float, noise: torch.Tensor,
                cl_step: int | None = None):
    """The policy's forward pass of a training step.

    Returns ``(s', ũ, u, mask)``: bounded probabilities (with gradient), greedy and
    sampled policies, and the curriculum mask (None when every block is decided).
    With ``cl_step < K`` the first ``K − cl_step`` blocks are forced to 1 in both.
    """
    probs, _ = agent(inputs)
    probs = probs.float()
    greedy = greedy_policy(probs.detach())
    bprobs = bounded_probs(probs, alpha)
    sampled = sample_policy(bprobs.detach(), noise)
    num_blocks = probs.shape[1]
    if cl_step is None or cl_step >= num_blocks:
        return bprobs, greedy, sampled, None
    mask = curriculum_mask(len(inputs), num_blocks, cl_step, probs.device)
    return bprobs, apply_curriculum(greedy, mask), apply_curriculum(sampled, mask), mask


def curriculum_train_step(rnet: FlatResNet, agent: nn.Module, inputs: torch.Tensor,
                          targets: torch.Tensor, noise: torch.Tensor, *, alpha: float,
                          beta: float, penalty: float, cl_step: int, dynamic: bool = True,
                          amp: str = "none") -> StepOutput:
    """Curriculum learning: frozen ResNet (no gradient), both policies in one pass."""
    with autocast(amp, inputs.device):
        bprobs, greedy, sampled, mask = policy_pass(agent, inputs, alpha, noise, cl_step)
        with torch.no_grad():
            preds_greedy, preds_sampled = rnet.forward_policies(
                inputs, [greedy, sampled], dynamic=dynamic)
    reward_greedy, _ = reward(preds_greedy.float(), targets, greedy, penalty)
    reward_sampled, match = reward(preds_sampled.float(), targets, sampled, penalty)
    if mask is None:
        mask = torch.ones_like(sampled)
    loss = curriculum_loss(bprobs, sampled, advantage(reward_sampled, reward_greedy), mask, beta)
    return StepOutput(loss, match, sampled, reward_sampled)


def finetune_train_step(rnet: nn.Module, agent: nn.Module, inputs: torch.Tensor,
                        targets: torch.Tensor, noise: torch.Tensor, *, alpha: float,
                        penalty: float, world_size: int = 1, amp: str = "none") -> StepOutput:
    """Joint finetuning: greedy pass without gradient, sampled pass with gradient through
    the masked forward (the ResNet in train mode), as in the authors' finetune.py."""
    with autocast(amp, inputs.device):
        bprobs, greedy, sampled, _ = policy_pass(agent, inputs, alpha, noise)
        with torch.no_grad():
            preds_greedy = rnet(inputs, greedy)
        preds_sampled = rnet(inputs, sampled)
    reward_greedy, _ = reward(preds_greedy.float(), targets, greedy, penalty)
    reward_sampled, match = reward(preds_sampled.float(), targets, sampled, penalty)
    loss = finetune_loss(bprobs, sampled, advantage(reward_sampled, reward_greedy),
                         preds_sampled.float(), targets, sum_scale=world_size)
    return StepOutput(loss, match, sampled, reward_sampled)


class BlockDrop(Method):
    """The one-shot policy network of the paper."""

    name = "blockdrop"
    agent_class = PolicyNet
    agent_words = "a one-shot policy network"
    summary = "one-shot policy network (paper Sec. 3)"
    threshold_help = "block k is kept iff its keep probability s_k >= T (default 0.5)"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("blockdrop (--agent blockdrop)")
        self.option(group, "--policy_init", default=None,
                    help="ImageNet policy start: 'torchvision' (download resnet18's weights), a "
                         "state-dict PATH, or 'random'; default for a fresh curriculum run: "
                         "resnet18 from the torch hub cache, as in the paper (else it stops)")

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_policy(spec)

    def initialise(self, agent: nn.Module, spec: ModelSpec, args: argparse.Namespace,
                   stage: str) -> None:
        """The paper's ImageNet policy starts from torchvision's resnet18 (Sec. 4):
        a fresh curriculum run takes it from the hub cache unless ``--policy_init``
        says otherwise; finetuning only when asked."""
        path = resolve_policy_init(spec, getattr(args, "policy_init", None),
                                   default_from_cache=stage == CURRICULUM)
        init_policy(agent, spec, path)

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        ddp_agent = wrap(agent, where.device, where.info)
        if stage == CURRICULUM:  # both ResNet passes without gradient (Alg. 1)
            def step(inputs, targets, noise, cl_step):
                return curriculum_train_step(
                    rnet, ddp_agent, inputs, targets, noise, alpha=args.alpha, beta=args.beta,
                    penalty=args.penalty, cl_step=cl_step, dynamic=not args.masked, amp=args.amp)
            return ddp_agent, step
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        ddp_rnet = wrap(rnet, where.device, where.info)

        def ft_step(inputs, targets, noise, cl_step):
            return finetune_train_step(ddp_rnet, ddp_agent, inputs, targets, noise,
                                       alpha=args.alpha, penalty=args.penalty,
                                       world_size=where.info.world_size, amp=args.amp)
        return nn.ModuleList([ddp_rnet, ddp_agent]), ft_step

    @torch.no_grad()
    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        """Shift the keep head's biases so that the greedy policy keeps each block for about
        ``keep_fraction`` of ``images`` (a random policy network keeps about half)."""
        probs, _ = agent(images)
        logits = torch.logit(probs.double().clamp(1e-12, 1 - 1e-12))
        cut = torch.quantile(logits, 1.0 - keep_fraction, dim=0)
        agent.logit.bias.sub_(cut.to(agent.logit.bias))

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        return PolicyNetDecision(agent, source.threshold)

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        threshold = self.checked_threshold(threshold)
        return AgentSource(self.checked_agent(spec, agent), flop_table(spec.name).policy,
                           GREEDY if threshold is None else threshold)


register(BlockDrop())
