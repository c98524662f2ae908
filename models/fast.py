"""Inference copies of the networks: the same function, computed faster (paper Sec. 4.3).

Timing is BlockDrop's point, so evaluation and the frozen ResNet of curriculum
learning run on an inference copy of each network, built once:

* **BatchNorm folding**: in eval mode a BatchNorm is an affine map per channel,
  so it is folded into the convolution before it (weights scaled, a bias added)
  and replaced by the identity. Every forward path (full, masked, single,
  dynamic) and the policy network use the same folded copy.
* **Memory layout**: channels_last (NHWC) where the benchmark found it faster
  (the CPU); gathers and scatters of :mod:`models.dynamic` keep it.

The copy computes the same function as the original up to float rounding (as
between batch sizes); the original is left untouched and keeps training.
``FastOptions`` turns each choice off (``test.py --no-fold --no-channels-last``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
    """Fold every eval-mode BatchNorm of ``net`` into the convolution before it, in place:
    ``conv<i>``/``bn<i>`` pairs of a module, and ``Sequential(conv, bn)`` shortcuts."""
    for module in list(net.modules()):
        for i in range(1, 10):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if conv is None:
                break
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
        if isinstance(module, nn.Sequential):
            for j in range(len(module) - 1):
                if isinstance(module[j], nn.Conv2d) and isinstance(module[j + 1], nn.BatchNorm2d):
                    module[j] = fuse_conv_bn_eval(module[j], module[j + 1])
                    module[j + 1] = nn.Identity()
    return net


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
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast


def add_fast_flags(parser) -> None:
    """The flags that turn the inference optimisations off (test.py, cl_training.py)."""
    parser.add_argument("--no_fold", action="store_true",
                        help="keep BatchNorm separate at inference (default: folded into the "
                             "convolutions; same numbers up to float rounding)")
    parser.add_argument("--no_channels_last", action="store_true",
                        help="keep the NCHW layout at inference (default on CPU: channels_last)")


def options_from(args) -> FastOptions:
    """The FastOptions of parsed ``add_fast_flags`` arguments."""
    return FastOptions(fold_bn=not getattr(args, "no_fold", False),
                       channels_last=False if getattr(args, "no_channels_last", False) else None)


def inference_source(source, options: FastOptions = DEFAULT,
                     device: torch.device | None = None):
    """A policy source (models.sources) whose deciding network, if any, is an inference
    copy; the source itself is left untouched."""
    agent = getattr(source, "agent", None)
    if agent is None:
        return source
    fast = copy.copy(source)
    fast.agent = inference_copy(agent, options, device)
    return fast
