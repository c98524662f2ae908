"""The policy network of BlockDrop (paper Sec. 3.2; docs/models.md).

A small ResNet (ResNet-8 on CIFAR, ResNet-10 on ImageNet) looks at the image
once and outputs, for each of the K blocks of the base ResNet, the probability
of KEEPING it, ``probs = sigmoid(logit(features))``, plus a value head ``vnet``
that every released checkpoint carries (it is not used by the loss).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import FlatResNet


class PolicyNet(nn.Module):
    """Features (a FlatResNet without classifier) followed by two linear heads."""

    def __init__(self, features: FlatResNet, num_blocks: int, input_pool: int = 1):
        super().__init__()
        if features.fc is not None:
            raise ValueError("the policy's feature network must have no classifier")
        self.features = features
        self.input_pool = input_pool
        self.num_blocks = num_blocks
        self.logit = nn.Linear(features.feature_dim, num_blocks)
        self.vnet = nn.Linear(features.feature_dim, 1)
        # both heads as one (K+1)-output layer, set by fuse_heads() on inference copies;
        # not saved (the checkpoints hold logit and vnet)
        self.register_buffer("joint_weight", None, persistent=False)
        self.register_buffer("joint_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(probs, value)``: keep-probabilities (B, K) and values (B, 1)."""
        if self.input_pool > 1:
            x = F.avg_pool2d(x, self.input_pool)
        feats = self.features.forward_full(x)
        if self.joint_weight is not None:
            out = F.linear(feats, self.joint_weight, self.joint_bias)
            return torch.sigmoid(out[:, :-1]), out[:, -1:]
        return torch.sigmoid(self.logit(feats)), self.vnet(feats)

    @torch.no_grad()
    def fuse_heads(self) -> None:
        """Compute both heads with one matrix product from now on (inference copies,
        models.fast): the heads' current weights, stacked. Later changes to ``logit``
        or ``vnet`` are not seen, so this is for a network that no longer trains."""
        self.joint_weight = torch.cat([self.logit.weight, self.vnet.weight])
        self.joint_bias = torch.cat([self.logit.bias, self.vnet.bias])

    @torch.no_grad()
    def keep_all(self) -> None:
        """Make the policy keep every block (the authors' test.py without --load)."""
        self.logit.weight.zero_()
        self.logit.bias.fill_(10.0)
