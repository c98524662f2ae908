"""Policy sources: where the (B, K) keep/drop decisions come from (paper Sec. 4.1-4.2,
Tables 1-2; SPEC section 6).

A source maps a batch of images to a (B, K) 0/1 policy (1 keeps a block) and knows
what deciding costs per image (``policy_flops``). Evaluation, test.py, finetuning
and the benchmark take a source, so they need not know where a policy comes from:

* ``blockdrop``: the policy network's greedy policy, ``u_k = 1`` iff ``s_k >= 0.5``;
  its FLOPs count.
* ``firstk``, ``randomk``, ``distributek``: Table 1's heuristics, which keep the
  same K blocks for every image and run no network (``policy_flops = 0``).
* ``seq``: BlockDrop-seq (supplement, :mod:`models.seq`), which decides block i
  from the output of block i-1 while the ResNet runs; its gates' FLOPs count.

Adding a way of choosing blocks is one builder in :data:`BUILDERS` (and one test).
A fixed heuristic is simply a function ``(layers, k, seed) -> kept block indices``
registered in :data:`FIXED_RULES`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.rewards import greedy_policy

from .resnet import FlatResNet


class PolicySourceError(UserError, ValueError):
    """A policy source was asked for with a bad name, K or agent."""


# -- the fixed heuristics of Table 1 ---------------------------------------------
def firstk_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """FirstK: keep blocks 0..K-1 (the first K in forward order)."""
    return list(range(k))


def randomk_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """RandomK: K distinct blocks drawn once, uniformly, by ``torch.randperm`` on a
    generator seeded with ``seed``; every image keeps the same set."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(sum(layers), generator=generator)[:k].tolist())


def stage_quotas(layers: Sequence[int], k: int) -> list[int]:
    """How many of K blocks each stage keeps under DistributeK: one block at a time
    to the stages in order (first, second, ..., last, first, ...), skipping a stage
    once all its blocks are kept. Equal stages thus get floor(K/S) or ceil(K/S)
    blocks, the earlier stages taking the remainder."""
    quotas = [0] * len(layers)
    while sum(quotas) < k:
        for s, count in enumerate(layers):
            if quotas[s] < count and sum(quotas) < k:
                quotas[s] += 1
    return quotas


def distributek_blocks(layers: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """DistributeK: K blocks spread as evenly as possible over the stages, then
    evenly inside each stage.

    Rule: stage s keeps ``m_s`` blocks from :func:`stage_quotas`; inside a stage of
    ``n`` blocks the kept ones are ``floor(j * n / m_s)`` for ``j = 0..m_s-1``, so
    the stage's first block (the one that changes resolution) is always among
    them and the rest are evenly spaced. E.g. R110 (18,18,18), K=17: quotas
    6,6,5; stage blocks 0,3,6,9,12,15 | 0,3,6,9,12,15 | 0,3,7,10,14.
    """
    kept, offset = [], 0
    for count, m in zip(layers, stage_quotas(layers, k), strict=True):
        kept += [offset + (j * count) // m for j in range(m)]
        offset += count
    return kept


FIXED_RULES: dict[str, Callable[[Sequence[int], int, int], list[int]]] = {
    "firstk": firstk_blocks,
    "randomk": randomk_blocks,
    "distributek": distributek_blocks,
}


def fixed_vector(name: str, layers: Sequence[int], k: int, seed: int = 0) -> torch.Tensor:
    """The (K,) float 0/1 keep vector of the fixed rule ``name``."""
    num_blocks = sum(layers)
    check_k(k, num_blocks)
    vector = torch.zeros(num_blocks)
    vector[FIXED_RULES[name](layers, k, seed)] = 1.0
    return vector


def check_k(k: object, num_blocks: int, model: str = "") -> int:
    """``k`` as an int in 1..K, or PolicySourceError naming the valid range."""
    of = f" of {model}" if model else ""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_blocks:
        raise PolicySourceError(f"--k must be an integer between 1 and {num_blocks} "
                                f"(the blocks{of}), got {k!r}")
    return k


# -- sources ---------------------------------------------------------------------
class PolicySource:
    """Decisions for a batch. ``one_shot`` sources decide from the image alone
    (``__call__``); every source can ``run`` the ResNet under its decisions."""

    name: str
    k: int | None = None  # blocks kept by a fixed policy; None for learned ones
    policy_flops: int = 0  # per image
    one_shot: bool = True
    agent: nn.Module | None = None  # the network that decides, if any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval(self) -> PolicySource:
        """Put the source's network, if any, in eval mode."""
        if self.agent is not None:
            self.agent.eval()
        return self

    def to(self, device: torch.device) -> PolicySource:
        if self.agent is not None:
            self.agent.to(device)
        return self

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, policy)`` of ``rnet`` on ``x`` under this source's decisions.

        ``dynamic`` runs each block only for the images that keep it; ``False`` runs
        the masked forward. ``keep_first`` forces the first blocks to be kept (the
        curriculum of Alg. 1)."""
        policy = self(x)
        if keep_first:
            policy = policy.clone()
            policy[:, :keep_first] = 1
        if not dynamic:
            return rnet(x, policy), policy
        return rnet.forward_dynamic(x, policy), policy


class FixedSource(PolicySource):
    """The same keep vector for every image; no network runs, no FLOPs."""

    def __init__(self, name: str, vector: torch.Tensor, seed: int = 0):
        self.name = name
        self.vector = vector.float()
        self.k = int(self.vector.sum())
        self.seed = seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.vector.to(x.device).expand(x.shape[0], -1).clone()

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not dynamic or keep_first:
            return super().run(rnet, x, dynamic, keep_first)
        return rnet.forward_single(x, self.vector), self(x)


class AgentSource(PolicySource):
    """BlockDrop: the greedy policy of a one-shot policy network (Sec. 3.3)."""

    name = "blockdrop"

    def __init__(self, agent: nn.Module, policy_flops: int):
        self.agent = agent
        self.policy_flops = policy_flops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.agent(x)
        return greedy_policy(probs)


# -- the registry ----------------------------------------------------------------
def _blockdrop(spec, agent: nn.Module | None, k: int | None, seed: int) -> PolicySource:
    from models.seq import SeqAgent  # seq imports this module

    if agent is None:
        raise PolicySourceError("the blockdrop source needs a policy network (a checkpoint "
                                "with an 'agent')")
    if isinstance(agent, SeqAgent):
        raise PolicySourceError("the blockdrop source needs a one-shot policy network, "
                                "got a BlockDrop-seq agent (use the seq source)")
    from utils.flops import flop_table  # flops builds models; imported when needed

    return AgentSource(agent, flop_table(spec.name).policy)


def _seq(spec, agent: nn.Module | None, k: int | None, seed: int) -> PolicySource:
    from models.seq import SeqAgent, SeqSource

    if not isinstance(agent, SeqAgent):
        raise PolicySourceError("the seq source needs a BlockDrop-seq agent (a checkpoint "
                                "written with --agent seq)")
    return SeqSource(agent)


def _fixed(name: str):
    def build(spec, agent: nn.Module | None, k: int | None, seed: int) -> PolicySource:
        check_k(k, spec.num_blocks, spec.name)
        return FixedSource(name, fixed_vector(name, spec.layers, k, seed), seed)
    build.__doc__ = f"The fixed {name} source (Table 1)."
    return build


BUILDERS: dict[str, Callable[..., PolicySource]] = {
    "blockdrop": _blockdrop,
    **{name: _fixed(name) for name in FIXED_RULES},
    "seq": _seq,
}
SOURCE_NAMES: tuple[str, ...] = tuple(BUILDERS)


def build_source(name: str, spec, *, agent: nn.Module | None = None,
                 k: int | None = None, seed: int = 0) -> PolicySource:
    """The policy source ``name`` for the model ``spec``.

    ``agent``: the policy network (``blockdrop``) or BlockDrop-seq gates (``seq``);
    ``k`` (1..K) and ``seed`` (the ``randomk`` draw) for the fixed heuristics.
    An unknown name lists the valid ones.
    """
    if name not in BUILDERS:
        raise PolicySourceError(f"unknown policy {name!r}; valid policies: "
                                f"{', '.join(SOURCE_NAMES)}")
    return BUILDERS[name](spec, agent, k, seed)


def as_source(policy, policy_flops: int = 0) -> PolicySource:
    """``policy`` itself if it is a source; a bare policy network becomes ``blockdrop``
    costing ``policy_flops`` per image, a BlockDrop-seq agent the ``seq`` source."""
    if isinstance(policy, PolicySource):
        return policy
    from models.seq import SeqAgent, SeqSource

    if isinstance(policy, SeqAgent):
        return SeqSource(policy)
    return AgentSource(policy, policy_flops)


def ceil_usage(mean_usage: float) -> int:
    """K as the paper sets it for the baselines: BlockDrop's mean block usage rounded up."""
    return max(1, math.ceil(round(mean_usage, 6)))


# -- agent types (what a checkpoint's 'agent' entry holds) -------------------------
AGENT_TYPES: tuple[str, ...] = ("blockdrop", "seq")


def build_agent(spec, agent_type: str = "blockdrop") -> nn.Module:
    """A randomly initialised agent of ``agent_type``: the one-shot policy network
    (``blockdrop``) or BlockDrop-seq's gates (``seq``). An unknown type lists the valid ones."""
    from models import build_policy
    from models.seq import build_seq_agent

    builders = {"blockdrop": build_policy, "seq": build_seq_agent}
    if agent_type not in builders:
        raise PolicySourceError(f"unknown agent {agent_type!r}; valid agents: "
                                f"{', '.join(AGENT_TYPES)}")
    return builders[agent_type](spec)
