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


BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck}


def check_policy(policy: torch.Tensor, batch: int, num_blocks: int, values: bool = True) -> None:
    """Raise ValueError unless ``policy`` is a (batch, K) tensor of zeros and ones.
    ``values=False`` checks type, shape and dtype only (no device computation)."""
    if not isinstance(policy, torch.Tensor):
        raise ValueError(f"policy must be a tensor of shape ({batch}, {num_blocks}), "
                         f"got {type(policy).__name__}")
    if policy.dim() != 2 or policy.shape[0] != batch or policy.shape[1] != num_blocks:
        raise ValueError(f"policy must have shape (batch={batch}, K={num_blocks}), "
                         f"got {tuple(policy.shape)}")
    if not (policy.dtype == torch.bool or policy.dtype.is_floating_point or policy.dtype in
            (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"policy must be a bool, integer or float tensor, got {policy.dtype}")
    if values and policy.dtype != torch.bool and bool(((policy != 0) & (policy != 1)).any()):
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
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
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

    def _run_block(self, t: int, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """A kept block: relu(residual + F(x)); in place on F(x) when no gradient is built."""
        out = self.block(t)(x)
        if torch.is_grad_enabled():
            return F.relu(residual + out)
        return out.add_(residual).relu_()

    def _run_chain(self, x: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """Stem, the blocks flagged in ``keep`` (one flag per block) and head, for the whole batch."""
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            x = self._run_block(t, x, residual) if keep[t] else residual
        return self.head(x)

    # -- forward paths -------------------------------------------------------
    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Masked execution (the authors' training path): every block runs for the
        whole batch and the policy selects, per image, block output or residual."""
        check_policy(policy, x.shape[0], self.num_blocks)
        return self._in_chunks(self._forward_masked, x, policy)

    def _forward_masked(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        mask = policy.to(x.dtype)
        keep_any = policy.bool().any(0).tolist()
        x = self.stem(x)
        for t in range(self.num_blocks):
            residual = self.residual(t, x)
            if not keep_any[t]:  # the whole batch drops this block
                x = residual
                continue
            m = mask[:, t].view(-1, 1, 1, 1)
            x = self._run_block(t, x, residual) * m + residual * (1 - m)
        return self.head(x)

    def forward_single(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """One policy vector of K zeros/ones for the whole batch."""
        if not isinstance(policy, torch.Tensor):
            policy = torch.as_tensor(policy)
        check_policy(policy.reshape(1, -1) if policy.dim() == 1 else policy, 1, self.num_blocks)
        keep = policy.reshape(-1).bool().tolist()
        return self._in_chunks(lambda xs, _: self._run_chain(xs, keep), x)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block kept (the plain ResNet)."""
        keep = [True] * self.num_blocks
        return self._in_chunks(lambda xs, _: self._run_chain(xs, keep), x)

    def forward_policies(self, x: torch.Tensor, policies: Sequence[torch.Tensor],
                         dynamic: bool = True) -> List[torch.Tensor]:
        """Logits of the same images under several policies (e.g. the greedy and the
        sampled policy of a training step), one (B, num_classes) tensor per policy.

        ``dynamic=False`` runs the masked ``forward`` once per policy (the authors'
        way). ``dynamic=True`` runs one dynamic pass in which every image's stem and
        the leading blocks on which all its policies agree run once per image, and
        the remaining blocks once per distinct (image, policy) pair.
        """
        if not dynamic:
            return [self.forward(x, p) for p in policies]
        if len(policies) == 0:
            return []
        keeps = [_policy_on_host(p, x.shape[0], self.num_blocks) for p in policies]
        logits = self._in_chunks(self._policies_pass, x, torch.stack(keeps, 1), len(keeps))
        return list(logits.unbind(1))

    def _policies_pass(self, x: torch.Tensor, keeps: torch.Tensor) -> torch.Tensor:
        """Logits (B, P, classes) of ``x`` under the (B, P, K) bool CPU policies ``keeps``."""
        batch, count = keeps.shape[:2]
        differs = (keeps != keeps[:, :1]).any(0).any(0)  # (K,) some image's policies differ
        split = int(differs.to(torch.uint8).argmax()) if bool(differs.any()) else self.num_blocks
        # distinct (image, policy) rows; rows are ordered by image, then policy
        image = torch.arange(batch).repeat_interleave(count)
        pairs, inverse = torch.unique(torch.cat([image.unsqueeze(1), keeps.flatten(0, 1).long()], 1),
                                      dim=0, return_inverse=True)
        h = self._run_blocks(self.stem(x), keeps[:, 0], 0, split)
        if pairs.shape[0] != batch:
            h = _gather(h, pairs[:, 0].to(h.device))
        h = self._run_blocks(h, pairs[:, 1:].bool(), split, self.num_blocks)
        return self.head(h).index_select(0, inverse.to(h.device)).view(batch, count, -1)

    def forward_dynamic(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Per-image execution: each block runs only on the images that keep it.

        The whole policy is read in one host transfer. When the batch holds at most
        ``GROUP_MAX`` distinct policies (one image, or ImageNet's few dominant
        policies) the images are grouped by policy and each group runs its own
        chain of blocks. Otherwise, block by block, the rows that keep it are
        gathered, pushed through the block and written back; all others pass their
        residual on. Equal to ``forward`` in eval mode (BatchNorm in train mode
        would see different batches).
        """
        keep = _policy_on_host(policy, x.shape[0], self.num_blocks)
        # a block's working set is the rows that keep it: chunks grow as usage falls
        usage = float(keep.float().mean()) if keep.numel() else 1.0
        return self._in_chunks(self._forward_dynamic, x, keep, max(usage, 0.25))

    def _forward_dynamic(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        groups = _policy_groups(keep, self.GROUP_MAX)
        if groups is None:
            return self.head(self._run_blocks(self.stem(x), keep, 0, self.num_blocks))
        if len(groups) == 1:
            return self._run_chain(x, groups[0][0])
        out = None
        for vector, rows in groups:
            idx = rows.to(x.device, non_blocking=True)
            logits = self._run_chain(_gather(x, idx), vector)
            if out is None:
                out = logits.new_empty((x.shape[0],) + logits.shape[1:])
            out = _write_rows(out, idx, logits)
        return out

    # at most this many distinct policies in a batch: group the images by policy
    GROUP_MAX = 4
    # CPU inference (eval mode) splits a batch into chunks whose widest activation
    # takes at most this many bytes: large tensors fall out of the caches and, past
    # glibc's mmap threshold, are page-faulted in anew at every allocation.
    # In eval mode chunks compute the same function (BatchNorm uses running
    # statistics; float rounding may differ in the last bit, as between batch sizes);
    # every forward path uses it. 0 turns it off.
    cpu_chunk_bytes = 4 << 20

    def chunk_size(self, x: torch.Tensor, rows_per_image: float = 1.0) -> int:
        """Images per chunk for ``x``: the whole batch unless on CPU in eval mode.
        ``rows_per_image``: activation rows a block works on per image (several
        policies: one per policy; dynamic execution: the share that keeps a block)."""
        batch = x.shape[0]
        if self.training or x.device.type != "cpu" or self.cpu_chunk_bytes <= 0:
            return batch
        # the widest activation has 16 channels per input pixel in both layouts
        # (CIFAR stem: 16 x H x W; ImageNet stem 64 x H/2 x W/2, stage 1 256 x H/4 x W/4)
        per_image = 16 * x.shape[-2] * x.shape[-1] * x.element_size() * rows_per_image
        return max(1, min(batch, int(self.cpu_chunk_bytes // per_image)))

    def _in_chunks(self, fn, x: torch.Tensor, rows: Optional[torch.Tensor] = None,
                   rows_per_image: float = 1.0) -> torch.Tensor:
        """``fn(x, rows)`` on chunks of ``chunk_size(x, rows_per_image)`` images (rows
        split alike), concatenated."""
        size = self.chunk_size(x, rows_per_image)
        if size >= x.shape[0]:
            return fn(x, rows)
        return torch.cat([fn(x[i:i + size], None if rows is None else rows[i:i + size])
                          for i in range(0, x.shape[0], size)])

    def _run_blocks(self, x: torch.Tensor, keep: torch.Tensor, start: int,
                    stop: int) -> torch.Tensor:
        """Blocks ``start..stop-1`` on features ``x``; ``keep`` is a (B, K) bool CPU tensor
        of the rows of ``x``. Each block runs on the gathered rows that keep it."""
        batch = x.shape[0]
        if start >= stop:
            return x
        cols = keep[:, start:stop]
        counts = cols.sum(0).tolist()
        # the row indices of every block, moved to the device in one transfer
        rows = cols.t().nonzero()[:, 1].to(x.device, non_blocking=True).split(counts)
        for t in range(start, stop):
            n = counts[t - start]
            residual = self.residual(t, x)
            if n == 0:
                x = residual
            elif n == batch:
                x = self._run_block(t, x, residual)
            else:
                idx = rows[t - start]
                xs = _gather(x, idx)
                res = xs if residual is x else _gather(residual, idx)
                x = _write_rows(residual, idx, self._run_block(t, xs, res))
        return x


def _policy_on_host(policy: torch.Tensor, batch: int, num_blocks: int) -> torch.Tensor:
    """Validate a (batch, K) policy and return it as a bool CPU tensor (one host sync)."""
    if isinstance(policy, torch.Tensor):
        check_policy(policy, batch, num_blocks, values=False)  # before any transfer
        policy = policy.detach().cpu()
    check_policy(policy, batch, num_blocks)
    return policy.bool()


def _policy_groups(keep: torch.Tensor, max_groups: int):
    """``[(keep flags, row indices)]`` per distinct policy of ``keep`` (B, K), or None
    when there are more than ``max_groups`` distinct policies."""
    if keep.shape[0] == 0:
        return None
    if keep.shape[0] > max_groups:
        # cheap rejection: more distinct rows among the first few than allowed
        if torch.unique(keep[: 4 * max_groups], dim=0).shape[0] > max_groups:
            return None
    vectors, inverse = torch.unique(keep, dim=0, return_inverse=True)
    if vectors.shape[0] > max_groups:
        return None
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=vectors.shape[0]).tolist()
    return [(v.tolist(), rows) for v, rows in zip(vectors, order.split(counts))]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, idx)`` that keeps a channels_last layout channels_last."""
    if _is_nhwc(x):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def _write_rows(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``base`` with ``rows`` written at ``idx`` along dim 0: in place when no gradient
    is built (``base`` is then an intermediate the caller owns), else a copy."""
    if torch.is_grad_enabled():
        return base.index_copy(0, idx, rows)
    if _is_nhwc(base) and _is_nhwc(rows):  # copy whole contiguous images
        base.permute(0, 2, 3, 1).index_copy_(0, idx, rows.permute(0, 2, 3, 1))
        return base
    return base.index_copy_(0, idx, rows)


def _is_nhwc(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
