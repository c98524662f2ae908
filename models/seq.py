"""BlockDrop-seq, the sequential variant of the supplement ("Ours-seq", Table 2).

Before residual block i a per-block linear gate looks at the global-average-pooled
output of block i-1 (the stem's output for block 0) and gives a softmax over
{drop, keep}:

    p_i = softmax(W_i · pool(y_{i-1}) + b_i),   s_i = p_i[keep].

Decisions are taken one block at a time while the ResNet runs. In training block
i is kept with probability ``s'_i = α·s_i + (1-α)·(1-s_i)`` (the bounded sampling
of BlockDrop, SPEC section 4); at test time the decision is the argmax of p_i
(keep iff ``p_keep > p_drop``), and the block is then run or skipped.

The gates read the ResNet's activations without passing gradient back into it
(``pool(y).detach()``): as in BlockDrop the policy-gradient term trains the
policy and the cross-entropy trains the ResNet.

Execution: ``masked`` runs every block on every image and selects block output
or residual per image (training, and no host synchronisation); ``grouped`` runs
each block only on the rows that keep it (gather, block, write back), one host
synchronisation per block. At batch 1 ``grouped`` really skips the block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.rewards import bounded_probs

from .dynamic import chunk_size, gather, write_rows
from .resnet import FlatResNet
from .sources import PolicySource

AGENT_TYPE = "seq"
MODES = ("masked", "grouped")
# the eval-mode execution for batches of more than one image (chosen by measurement,
# see docs/policies.md and ``python -m scripts.benchmark --parts seq``)
DEFAULT_BATCH_MODE = "grouped"


class SeqAgent(nn.Module):
    """The gates of BlockDrop-seq: one ``Linear(C_in(i), 2)`` per residual block, where
    ``C_in(i)`` is the channel count of block i's input."""

    agent_type = AGENT_TYPE

    def __init__(self, in_channels: Sequence[int]):
        super().__init__()
        self.in_channels: tuple[int, ...] = tuple(in_channels)
        self.gates = nn.ModuleList(nn.Linear(c, 2) for c in self.in_channels)

    @property
    def num_blocks(self) -> int:
        return len(self.gates)

    @property
    def flops(self) -> int:
        """FLOPs of all K gates per image (linear layers: 2·in·out; pooling is free)."""
        return sum(2 * g.in_features * g.out_features for g in self.gates)

    def gate_logits(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits over {drop, keep} of block ``t`` from its input ``h``."""
        return self.gates[t](h.detach().mean((2, 3)))



class SeqNet(nn.Module):
    """A ResNet and its BlockDrop-seq gates as one module, so that a training step is one
    ``forward`` (which DistributedDataParallel needs to synchronise both)."""

    def __init__(self, rnet: FlatResNet, agent: SeqAgent):
        super().__init__()
        self.rnet = rnet
        self.agent = agent

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, alpha: float = 0.8,
                keep_first: int = 0, mode: str = "masked") -> SeqOutput:
        """:func:`seq_pass` of the held ResNet and gates."""
        return seq_pass(self.rnet, self.agent, x, noise, alpha, keep_first, mode)


def block_in_channels(rnet: FlatResNet) -> list[int]:
    """The input channels of each residual block of ``rnet``, in flat order."""
    return [rnet.block(t).conv1.in_channels for t in range(rnet.num_blocks)]


def build_seq_agent(spec) -> SeqAgent:
    """BlockDrop-seq gates for the base ResNet of ``spec`` (randomly initialised)."""
    from models import build_resnet

    with torch.device("meta"):  # only the layout is read
        rnet = build_resnet(spec)
    return SeqAgent(block_in_channels(rnet))


@dataclass
class SeqOutput:
    logits: torch.Tensor  # (B, classes)
    probs: torch.Tensor  # (B, K) keep-probabilities s (with gradient to the gates)
    policy: torch.Tensor  # (B, K) float 0/1 decisions taken


def seq_pass(rnet: FlatResNet, agent: SeqAgent, x: torch.Tensor,
             noise: torch.Tensor | None = None, alpha: float = 0.8, keep_first: int = 0,
             mode: str = "masked") -> SeqOutput:
    """The interleaved pass: gate, then block or skip, block after block.

    ``noise`` (B, K) uniform samples: block t is kept where ``noise[:, t] < s'_t``;
    None takes the greedy (argmax) decision. The first ``keep_first`` blocks are
    kept whatever the gates say (curriculum learning, Alg. 1); their gates still run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if agent.num_blocks != rnet.num_blocks:
        raise ValueError(f"the agent decides {agent.num_blocks} blocks, the ResNet has "
                         f"{rnet.num_blocks}")
    h = rnet.stem(x)
    probs, decisions = [], []
    for t in range(rnet.num_blocks):
        logits = agent.gate_logits(t, h)
        s = F.softmax(logits.float(), dim=1)[:, 1]
        if t < keep_first:
            keep = torch.ones_like(s)
        elif noise is None:
            keep = (logits[:, 1] > logits[:, 0]).to(s.dtype)
        else:
            keep = (noise[:, t].to(s.device) < bounded_probs(s.detach(), alpha)).to(s.dtype)
        residual = rnet.residual(t, h)
        h = _grouped_block(rnet, t, h, residual, keep) if mode == "grouped" else \
            _masked_block(rnet, t, h, residual, keep)
        probs.append(s)
        decisions.append(keep)
    return SeqOutput(rnet.head(h), torch.stack(probs, 1), torch.stack(decisions, 1))


def _masked_block(rnet: FlatResNet, t: int, h: torch.Tensor, residual: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """Every image runs the block; the decision selects output or residual."""
    m = keep.to(h.dtype).view(-1, 1, 1, 1)
    return rnet.run_block(t, h, residual) * m + residual * (1 - m)


def _grouped_block(rnet: FlatResNet, t: int, h: torch.Tensor, residual: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
    """Only the rows that keep the block run it (one host synchronisation)."""
    rows = keep.nonzero().view(-1)
    n = rows.numel()
    if n == 0:
        return residual
    if n == h.shape[0]:
        return rnet.run_block(t, h, residual)
    hs = gather(h, rows)
    res = hs if residual is h else gather(residual, rows)
    return write_rows(residual, rows, rnet.run_block(t, hs, res))


class SeqSource(PolicySource):
    """BlockDrop-seq as a policy source: greedy gates interleaved with the blocks."""

    name = "seq"
    one_shot = False

    def __init__(self, agent: SeqAgent, batch_mode: str = DEFAULT_BATCH_MODE):
        self.agent = agent
        self.policy_flops = agent.flops
        self.batch_mode = batch_mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("BlockDrop-seq decides while the ResNet runs; use run(rnet, x)")

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decisions. ``dynamic``: batch 1 skips for real, larger batches run
        ``batch_mode``; ``False`` runs masked."""
        mode = "masked"
        if dynamic:
            mode = "grouped" if x.shape[0] == 1 else self.batch_mode
        size = chunk_size(rnet, x)
        outs = [seq_pass(rnet, self.agent, x[i:i + size], keep_first=keep_first, mode=mode)
                for i in range(0, x.shape[0], size)] if x.shape[0] else \
            [seq_pass(rnet, self.agent, x, keep_first=keep_first, mode=mode)]
        return torch.cat([o.logits for o in outs]), torch.cat([o.policy for o in outs])
