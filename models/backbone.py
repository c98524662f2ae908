"""What a backbone must provide for blocks to be dropped, executed per image, counted
and decided on: the interface :class:`models.resnet.FlatResNet` implements.

Dynamic execution (:mod:`models.dynamic`), FLOP counting (:mod:`models.flops`),
inference copies (:mod:`models.fast`) and the methods' gates (:mod:`policies`)
call only these members, so another family of networks with residual blocks
(docs/adding-a-model.md) plugs in by implementing them. The one rule every path
shares: block t passes ``residual(t, x)`` on when dropped and
``run_block(t, x, residual(t, x))`` when kept.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class ActivationSize(Protocol):
    """The part of a network's spec that CPU chunking reads."""

    def widest_activation(self, height: int, width: int) -> int:
        """Elements per image of the largest activation for an input of this size."""


@runtime_checkable
class Backbone(Protocol):
    """A network of K residual blocks addressed by one flat index t = 0..K-1."""

    spec: ActivationSize
    training: bool
    # CPU inference splits a batch so that the widest activation takes at most this many
    # bytes (models.dynamic.chunk_size); 0 turns chunking off
    cpu_chunk_bytes: int

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks that can be dropped."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before block 0 (run for every image)."""

    def residual(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """What block t passes on when dropped: ``x``, or the stage shortcut of a block
        that changes resolution or width (which runs even when the block is dropped)."""

    def block(self, t: int) -> nn.Module:
        """Block t's residual function F (its parameters are what a method may freeze)."""

    def run_block(self, t: int, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Block t kept: ``relu(residual + F(x))``."""

    def run_chain(self, x: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """Stem, the blocks flagged in ``keep`` and head, for the whole batch."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The layers after the last block: pooling and classifier (the logits)."""

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Masked execution under a (B, K) 0/1 policy (None: every block)."""
