"""Inference copies of the networks: the same function, computed faster (paper Sec. 4.3).

Timing is BlockDrop's point, so evaluation and the frozen ResNet of curriculum
learning run on an inference copy of each network, built once:

* **BatchNorm folding**: in eval mode a BatchNorm is an affine map per channel,
  so it is folded into the convolution before it (weights scaled, a bias added)
  and replaced by the identity. Every forward path (full, masked, single,
  dynamic) and the policy network use the same folded copy. A folded residual
  block then runs as a :class:`FoldedBlock`: its convolutions called directly,
  without a module call per layer (a tenth of the time at batch 1).
* **Policy heads**: the policy network's two linear heads run as one matrix
  product (``PolicyNet.fuse_heads``).
* **Memory layout**: channels_last (NHWC) where the benchmark found it faster
  (the CPU); gathers and scatters of :mod:`models.dynamic` keep it.

The copy computes the same function as the original up to float rounding (as
between batch sizes); the original is left untouched and keeps training.
``FastOptions`` turns each choice off (``test.py --no_fold --no_channels_last``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .resnet import BasicBlock, Bottleneck

M = TypeVar("M", bound=nn.Module)

# devices on which the benchmark measured channels_last faster (CUDA: not measured)
CHANNELS_LAST_DEVICES = ("cpu",)


@dataclass(frozen=True)
class FastOptions:
    """Which inference optimisations to apply; None: the device's default."""

    fold_bn: bool = True
    channels_last: bool | None = None

    def layout_for(self, device: torch.device) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return torch.device(device).type in CHANNELS_LAST_DEVICES


DEFAULT = FastOptions()  # what test.py and training use
OFF = FastOptions(fold_bn=False, channels_last=False)


def fold_batchnorm(net: M) -> M:
    """Fold every eval-mode BatchNorm of ``net`` into the convolution before it, in place.
    A residual block becomes a :class:`FoldedBlock`, a ``Sequential(conv, bn)`` shortcut
    its convolution; any other ``conv<i>``/``bn<i>`` pair of a module (the stem) keeps
    the convolution and an identity for the BatchNorm."""
    _fold_pairs(net)
    for name, child in list(net._modules.items()):
        if isinstance(child, (BasicBlock, Bottleneck)):
            net._modules[name] = FoldedBlock(_fold_pairs(child))
        elif (isinstance(child, nn.Sequential) and len(child) == 2
              and isinstance(child[0], nn.Conv2d) and isinstance(child[1], nn.BatchNorm2d)):
            _fold_into(child[0], child[1])
            net._modules[name] = child[0]
        elif child is not None:
            fold_batchnorm(child)
    return net


def _fold_pairs(module: nn.Module) -> list[nn.Conv2d]:
    """Fold each ``bn<i>`` of ``module`` into its ``conv<i>`` (the BatchNorm becomes the
    identity); returns the convolutions ``conv1, conv2, ...``."""
    convs = []
    while isinstance(conv := getattr(module, f"conv{len(convs) + 1}", None), nn.Conv2d):
        convs.append(conv)
        name = f"bn{len(convs)}"
        if isinstance(getattr(module, name, None), nn.BatchNorm2d):
            _fold_into(conv, getattr(module, name))
            setattr(module, name, nn.Identity())
    return convs


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Give ``conv`` the weight and bias of ``bn(conv(x))`` (eval-mode statistics)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                  bn.running_var, bn.eps, bn.weight, bn.bias)


class FoldedBlock(nn.Module):
    """A residual function (BasicBlock, Bottleneck) whose BatchNorms are folded into its
    convolutions: the convolutions (with biases) called directly, a ReLU between them,
    none after the last. The same function as the block it replaces, without a module
    call or an attribute lookup per layer and with the geometry as plain ints (at
    batch 1 such overheads cost a tenth of the time)."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        for i, conv in enumerate(convs, 1):  # the block's names: conv1.weight, conv1.bias, ...
            self.add_module(f"conv{i}", conv)
        self._refresh()

    def _refresh(self) -> None:
        """(weight, bias, stride, padding) of each convolution, looked up once."""
        self.layers = [(c.weight, c.bias, _scalar(c.stride), _scalar(c.padding))
                       for c in self._modules.values()]

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), ...: parameters may be new tensors
        out = super()._apply(*args, **kwargs)
        self._refresh()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *inner, (weight, bias, stride, padding) = self.layers
        for w, b, s, p in inner:
            x = F.conv2d(x, w, b, s, p).relu_()
        return F.conv2d(x, weight, bias, stride, padding)


def _scalar(pair: tuple[int, ...]) -> int | tuple[int, ...]:
    """An int for equal entries (the convolution parses it faster than a tuple)."""
    return pair[0] if len(set(pair)) == 1 else pair


@torch.no_grad()
def inference_copy(net: M, options: FastOptions = DEFAULT,
                   device: torch.device | None = None) -> M:
    """An eval-mode copy of ``net`` with ``options`` applied (``net`` itself when none
    apply). ``device``: where it runs (default: where its parameters are)."""
    if device is None:
        device = next(net.parameters()).device
    channels_last = options.layout_for(device)
    if not (options.fold_bn or channels_last):
        return net.eval()
    fast = copy.deepcopy(net).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if options.fold_bn:
        fold_batchnorm(fast)
        if hasattr(fast, "fuse_heads"):  # a policy network: one product for both heads
            fast.fuse_heads()
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast
