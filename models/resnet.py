"""Flat residual networks whose blocks can be dropped per image (paper Sec. 3.1).

The network keeps its residual blocks in ``blocks[stage][block]`` and the
stage shortcuts in ``ds[stage]`` (the layout of the authors' checkpoints,
SPEC section 3). Every forward path shares one block-dropping rule (SPEC
section 2): for block ``b`` of stage ``s``

    residual = ds[s](x) if b == 0 else x
    kept:    x = relu(residual + F(x))
    dropped: x = residual

so the shortcut of a stage's first block runs even when that block is dropped.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual function F(x) = BN(conv3x3(ReLU(BN(conv3x3(x))))), no final ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(nn.Module):
    """Residual function 1x1 -> 3x3 (with the stride) -> 1x1, BN after each, ReLU between."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ZeroPadShortcut(nn.Module):
    """Parameter-free CIFAR shortcut: average-pool by the stride, then zero-pad the channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck}


def check_policy(policy: torch.Tensor, batch: int, num_blocks: int) -> None:
    """Raise ValueError unless ``policy`` is a (batch, K) tensor of zeros and ones."""
    if not isinstance(policy, torch.Tensor):
        raise ValueError(f"policy must be a tensor of shape ({batch}, {num_blocks}), "
                         f"got {type(policy).__name__}")
    if policy.dim() != 2 or policy.shape[0] != batch or policy.shape[1] != num_blocks:
        raise ValueError(f"policy must have shape (batch={batch}, K={num_blocks}), "
                         f"got {tuple(policy.shape)}")
    if not (policy.dtype == torch.bool or policy.dtype.is_floating_point or policy.dtype in
            (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"policy must be a bool, integer or float tensor, got {policy.dtype}")
    if policy.dtype != torch.bool and bool(((policy != 0) & (policy != 1)).any()):
        raise ValueError("policy values must be 0 (drop) or 1 (keep)")


class FlatResNet(nn.Module):
    """A ResNet whose residual blocks are addressed by one flat index t = 0..K-1.

    ``arch="cifar"``: 3x3 stem 3->16, stages of widths 16/32/64 with zero-padding
    shortcuts. ``arch="imagenet"``: 7x7/2 stem 3->64 and 3x3/2 max-pool, stages of
    widths 64/128/256/512 with 1x1 conv + BN shortcuts. ``num_classes=None``
    leaves out the classifier (the policy network's feature extractor).
    """

    def __init__(self, arch: str, block: str, layers: Sequence[int],
                 num_classes: Optional[int], avgpool: int):
        super().__init__()
        if arch not in ("cifar", "imagenet"):
            raise ValueError(f"arch must be 'cifar' or 'imagenet', got {arch!r}")
        block_cls = BLOCK_TYPES[block]
        self.arch = arch
        self.layers: Tuple[int, ...] = tuple(layers)
        if arch == "cifar":
            widths, strides, self.inplanes = (16, 32, 64), (1, 2, 2), 16
            self.conv1 = conv3x3(3, 16)
            self.bn1 = nn.BatchNorm2d(16)
        else:
            widths, strides, self.inplanes = (64, 128, 256, 512), (1, 2, 2, 2), 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
        if len(self.layers) != len(widths):
            raise ValueError(f"{arch} ResNet needs {len(widths)} stages, got {self.layers}")
        blocks, shortcuts = [], []
        for planes, count, stride in zip(widths, self.layers, strides):
            stage, shortcut = self._make_stage(block_cls, planes, count, stride)
            blocks.append(nn.ModuleList(stage))
            shortcuts.append(shortcut)
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(shortcuts)
        self.avgpool_kernel = avgpool
        self.feature_dim = widths[-1] * block_cls.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes else None
        # (stage, block) of every flat block index t
        self.block_index: List[Tuple[int, int]] = [
            (s, b) for s, count in enumerate(self.layers) for b in range(count)]
        self._init_weights()

    @property
    def num_blocks(self) -> int:
        return len(self.block_index)

    def _make_stage(self, block_cls, planes: int, count: int, stride: int):
        out_planes = planes * block_cls.expansion
        shortcut: nn.Module = nn.Sequential()  # identity, no parameters
        if stride != 1 or self.inplanes != out_planes:
            if self.arch == "cifar":
                shortcut = ZeroPadShortcut(self.inplanes, out_planes, stride)
            else:
                shortcut = nn.Sequential(
                    nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_planes))
        stage = [block_cls(self.inplanes, planes, stride)]
        self.inplanes = out_planes
        stage += [block_cls(self.inplanes, planes) for _ in range(1, count)]
        return stage, shortcut

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- pieces shared by every forward path ---------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.arch == "imagenet":
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, self.avgpool_kernel).flatten(1)
        return self.fc(x) if self.fc is not None else x

    def residual(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """The value block t passes on when dropped (the stage shortcut for a first block)."""
        s, b = self.block_index[t]
        return self.ds[s](x) if b == 0 else x

    def block(self, t: int) -> nn.Module:
        s, b = self.block_index[t]
        return self.blocks[s][b]

    # -- forward paths -------------------------------------------------------
    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Masked execution (the authors' training path): every block runs for the
        whole batch and the policy selects, per image, block output or residual."""
        check_policy(policy, x.shape[0], self.num_blocks)
        mask = policy.to(x.dtype)
        keep_any = policy.bool().any(0).tolist()
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            if not keep_any[t]:  # the whole batch drops this block
                x = residual
                continue
            m = mask[:, t].view(-1, 1, 1, 1)
            fx = F.relu(residual + self.block(t)(x))
            x = fx * m + residual * (1 - m)
        return self.head(x)

    def forward_single(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """One policy vector of K zeros/ones for the whole batch."""
        if not isinstance(policy, torch.Tensor):
            policy = torch.as_tensor(policy)
        check_policy(policy.reshape(1, -1) if policy.dim() == 1 else policy, 1, self.num_blocks)
        keep = policy.reshape(-1).bool().tolist()
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            x = F.relu(residual + self.block(t)(x)) if keep[t] else residual
        return self.head(x)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block kept (the plain ResNet)."""
        x = self.stem(x)
        for t in range(self.num_blocks):
            x = F.relu(self.residual(t, x) + self.block(t)(x))
        return self.head(x)

    def forward_policies(self, x: torch.Tensor, policies: Sequence[torch.Tensor],
                         dynamic: bool = True) -> List[torch.Tensor]:
        """Logits of the same images under several policies (e.g. the greedy and the
        sampled policy of a training step). ``dynamic=True`` runs them as one
        ``forward_dynamic`` pass over the stacked batch; ``dynamic=False`` runs the
        masked ``forward`` once per policy (the authors' way)."""
        if not dynamic:
            return [self.forward(x, p) for p in policies]
        stacked = self.forward_dynamic(x.repeat(len(policies), 1, 1, 1), torch.cat(list(policies)))
        return list(stacked.split(x.shape[0]))

    def forward_dynamic(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Per-image execution: each block runs only on the images that keep it.

        The rows that keep block t are gathered, pushed through the block and
        written back; all others pass their residual on. Equal to ``forward``
        in eval mode (BatchNorm in train mode would see different batches).
        """
        check_policy(policy, x.shape[0], self.num_blocks)
        keep = policy.bool()
        counts = keep.sum(0).tolist()
        # indices of the images that keep each block, from a single host sync
        rows = keep.t().nonzero()[:, 1].split(counts)
        batch = x.shape[0]
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            if counts[t] == batch:
                x = F.relu(residual + self.block(t)(x))
            elif counts[t] == 0:
                x = residual
            else:
                idx = rows[t]
                fx = F.relu(residual.index_select(0, idx) + self.block(t)(x.index_select(0, idx)))
                x = residual.index_copy(0, idx, fx)
        return self.head(x)
