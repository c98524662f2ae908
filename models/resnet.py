"""Flat residual networks whose blocks can be dropped per image (paper Sec. 3.1).

The network keeps its residual blocks in ``blocks[stage][block]`` and the
block-stage shortcuts in ``ds[stage]`` (the layout of the authors' checkpoints,
docs/checkpoints.md). Every forward path shares one block-dropping rule
(docs/models.md): for block ``b`` of block stage ``s``

    residual = ds[s](x) if b == 0 else x
    kept:    x = relu(residual + F(x))
    dropped: x = residual

so the shortcut of a stage's first block runs even when that block is dropped.

The layout comes from a :class:`models.specs.NetSpec`. This module holds the
network and the semantics; how a batch is executed (per-image gathers, policy
grouping, CPU chunking) lives in :mod:`models.dynamic`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dynamic as dyn
from .dynamic import check_policy
from .specs import NetSpec


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
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
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
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
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


def conv_bn_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """ImageNet shortcut: 1x1 conv with the stride, then BatchNorm (``ds.<s>.0/1``)."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes))


BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck}
SHORTCUT_TYPES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "zero_pad": ZeroPadShortcut, "conv": conv_bn_shortcut}


class FlatResNet(nn.Module):
    """A ResNet whose residual blocks are addressed by one flat index t = 0..K-1.

    Built from a :class:`NetSpec` (stem, stage widths, strides, blocks per stage,
    block type, shortcut kind, final pooling). ``num_classes=None`` leaves out the
    classifier (the policy network's feature extractor).
    """

    # CPU inference (eval mode) splits a batch into chunks whose widest activation
    # takes at most this many bytes (models.dynamic.chunk_size); 0 turns it off.
    cpu_chunk_bytes = 4 << 20

    def __init__(self, spec: NetSpec, num_classes: int | None):
        super().__init__()
        self.spec = spec
        self.layers: tuple[int, ...] = tuple(spec.layers)
        block_cls = BLOCK_TYPES[spec.block]
        stem = spec.stem
        self.conv1 = nn.Conv2d(3, stem.channels, kernel_size=stem.kernel, stride=stem.stride,
                               padding=stem.kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem.channels)
        self.inplanes = stem.channels
        blocks, shortcuts = [], []
        for planes, count, stride in zip(spec.widths, self.layers, spec.strides, strict=True):
            stage, shortcut = self._make_stage(block_cls, planes, count, stride)
            blocks.append(nn.ModuleList(stage))
            shortcuts.append(shortcut)
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(shortcuts)
        self.avgpool_kernel = spec.final_pool
        self.feature_dim = spec.feature_dim
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes else None
        # (stage, block) of every flat block index t
        self.block_index: list[tuple[int, int]] = [
            (s, b) for s, count in enumerate(self.layers) for b in range(count)]
        self.stage_names = [f"stage {s + 1} blocks" for s in range(len(self.layers))]
        self._block_keys = [(str(s), str(b)) for s, b in self.block_index]
        self._init_weights()

    @property
    def num_blocks(self) -> int:
        return len(self.block_index)

    def _make_stage(self, block_cls, planes: int, count: int, stride: int):
        out_planes = planes * block_cls.expansion
        shortcut: nn.Module = nn.Sequential()  # identity, no parameters
        if stride != 1 or self.inplanes != out_planes:
            shortcut = SHORTCUT_TYPES[self.spec.shortcut](self.inplanes, out_planes, stride)
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
        with dyn.section("stem"):
            x = F.relu(self.bn1(self.conv1(x)), inplace=True)
            if self.spec.stem.maxpool:
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        with dyn.section("head"):
            x = F.avg_pool2d(x, self.avgpool_kernel).flatten(1)
            return self.fc(x) if self.fc is not None else x

    def residual(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """The value block t passes on when dropped (the stage shortcut for a first block)."""
        s, b = self.block_index[t]
        if b != 0:
            return x
        with dyn.section("shortcuts"):
            return self.ds[s](x)

    def block(self, t: int) -> nn.Module:
        # the ModuleLists' dicts directly: ``self.blocks[s][b]`` costs ~5 us, a tenth of a
        # small block at batch 1; always in step with modules replaced in the lists
        s, b = self._block_keys[t]
        return self.blocks._modules[s]._modules[b]

    def run_block(self, t: int, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """A kept block: relu(residual + F(x)); in place on F(x) when no gradient is built."""
        with dyn.section(self.stage_names[self.block_index[t][0]]):
            out = self.block(t)(x)
            if torch.is_grad_enabled():
                return F.relu(residual + out)
            return out.add_(residual).relu_()

    def run_chain(self, x: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """Stem, the blocks flagged in ``keep`` (one flag per block) and head, for the whole
        batch."""
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            x = self.run_block(t, x, residual) if keep[t] else residual
        return self.head(x)

    def run_masked(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Every block runs for the whole batch; the (B, K) policy selects, per image,
        block output or residual (a block dropped by the whole batch is skipped)."""
        mask = policy.to(x.dtype)
        keep_any = policy.bool().any(0).tolist()
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            if not keep_any[t]:  # the whole batch drops this block
                x = residual
                continue
            m = mask[:, t].view(-1, 1, 1, 1)
            x = self.run_block(t, x, residual) * m + residual * (1 - m)
        return self.head(x)

    # -- forward paths (docs/interfaces.md); execution in models.dynamic -----
    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Masked execution (the authors' training path); ``policy=None`` runs the full
        network (every block kept)."""
        if policy is None:
            return self.forward_full(x)
        check_policy(policy, x.shape[0], self.num_blocks)
        return dyn.in_chunks(self, self.run_masked, x, policy)

    def forward_single(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """One policy vector of K zeros/ones for the whole batch."""
        if not isinstance(policy, torch.Tensor):
            policy = torch.as_tensor(policy)
        check_policy(policy.reshape(1, -1) if policy.dim() == 1 else policy, 1, self.num_blocks)
        keep = policy.reshape(-1).bool().tolist()
        return dyn.in_chunks(self, lambda xs, _: self.run_chain(xs, keep), x)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block kept (the plain ResNet)."""
        keep = [True] * self.num_blocks
        return dyn.in_chunks(self, lambda xs, _: self.run_chain(xs, keep), x)

    def forward_dynamic(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Each block runs only on the images that keep it; equal to ``forward`` in eval
        mode (see :func:`models.dynamic.forward_dynamic`)."""
        return dyn.forward_dynamic(self, x, policy)

    def forward_policies(self, x: torch.Tensor, policies: Sequence[torch.Tensor],
                         dynamic: bool = True) -> list[torch.Tensor]:
        """Logits of the same images under several policies, one (B, classes) tensor
        each; ``dynamic=False`` runs the masked ``forward`` once per policy (see
        :func:`models.dynamic.forward_policies`)."""
        return dyn.forward_policies(self, x, policies, dynamic)
