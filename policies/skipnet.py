"""SkipNet: a recurrent gate before each residual block decides whether it runs.

Wang, Yu, Dou, Darrell, Gonzalez. *SkipNet: Learning Dynamic Routing in
Convolutional Networks*. ECCV 2018 (arXiv 1711.09485); docs/methods.md.

The recurrent gate (paper Sec. 3, "Recurrent Gate Design"): block 0 always runs.
Before block t ≥ 1 the output h_{t-1} of the block before is global-average-pooled
and projected by the block's own linear embedding, and one LSTM shared by all
gates (embedding and hidden size 10) turns it into a keep-probability

    e_t = E_t · pool(h_{t-1}) + b_t,
    (z_t, c_t) = LSTM(e_t, (z_{t-1}, c_{t-1})),   z_0 = c_0 = 0,
    p_t = σ(w · z_t + b).

At test time block t runs iff p_t > 0.5 (:data:`TEST_THRESHOLD`); the decision is
taken while the ResNet runs, so a dropped block is not computed.

Training is the peer's hybrid learning, in the ``finetune`` stage:

* ``--skip_phase sp`` (supervised pre-training): the hard decision 1[p_t > 0.5]
  forward, the gradient of p_t backward (straight-through), loss = cross-entropy;
* ``--skip_phase hrl`` (hybrid reinforcement learning, the default): g_t ~
  Bernoulli(p_t); every skipped block earns r_t = (α/N)·(1 − g_t)·C_t (C_t = 1, N
  gates); the classification pays −CE at the end of the episode; the return of
  gate t is G_t = Σ_{j≥t} γ^{j−t} r_j − γ^{N−t}·CE, and the loss is
  CE + λ·mean_i Σ_t −log π(g_it)·G_it (REINFORCE, λ = ``--skip_rl_weight``).

``--agent skipnet_ff`` puts the peer's feed-forward gate (its FFGate-II) before each
block instead: the block's input h_{t-1} goes through one 3x3 convolution of stride 2
(C -> C), BatchNorm and ReLU, is global-average-pooled and mapped linearly to the keep
logit, p_t = σ(w_t · pool(relu(BN(conv_t(h_{t-1})))) + b_t); no state is carried
between gates. Training and test rule are the same as the recurrent gate's, with the
same flags.

The equations are the small functions below (:func:`lstm_cell`,
:func:`skip_rewards`, :func:`discounted_returns`, :func:`hrl_loss`).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FlatResNet, ModelSpec, build_resnet
from models.dynamic import in_chunks, run_on_rows
from models.export import Decision
from utils.amp import autocast
from utils.dist import wrap

from .method import FINETUNE, JointNet, Method, StepOutput, TrainStep, Where, register
from .seq import block_in_channels
from .source import PolicySource, check_pass

EMBED = 10  # the gate's embedding size (the peer's recurrent gates, CIFAR and ImageNet)
HIDDEN = 10  # the shared LSTM's hidden size
TEST_THRESHOLD = 0.5  # block t runs iff p_t > 0.5
KEEP_START = 0.9  # a fresh run's gates keep every block with this probability
PHASES = ("sp", "hrl")
MODES = ("masked", "grouped")


# -- the equations ------------------------------------------------------------------
def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from its pre-activations ``gates`` = W_ih·e + W_hh·z (+ biases),
    (B, 4H) in the order input, forget, cell, output: ``(z', c')`` with
    c' = σ(f)·c + σ(i)·tanh(g), z' = σ(o)·tanh(c')."""
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def skip_rewards(gated: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rewards of the N gates (B, N): r_t = (α/N)·(1 − g_t)·C_t with C_t = 1 (a skipped
    block earns α/N, a kept one nothing)."""
    return (1 - gated) * (alpha / gated.shape[1])


def discounted_returns(rewards: torch.Tensor, final: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """Returns (B, N) of the gates: G_t = Σ_{j≥t} γ^{j−t}·r_j + γ^{N−t}·final, where
    ``final`` (B,) is the reward at the end of the episode (−CE)."""
    out = torch.empty_like(rewards)
    ret = final
    for t in range(rewards.shape[1] - 1, -1, -1):
        ret = rewards[:, t] + gamma * ret
        out[:, t] = ret
    return out


def gate_log_prob(logits: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """log π(g_t) under Bernoulli(σ(logit_t)): g·log p + (1 − g)·log(1 − p), (B, N)."""
    return -F.binary_cross_entropy_with_logits(logits, gated, reduction="none")


def hrl_loss(logits: torch.Tensor, gated: torch.Tensor, returns: torch.Tensor,
             ce: torch.Tensor, rl_weight: float) -> torch.Tensor:
    """The hybrid loss: mean_i CE_i + λ·mean_i Σ_t −log π(g_it)·G_it (G without gradient)."""
    pg = (-gate_log_prob(logits, gated) * returns.detach()).sum(1).mean()
    return ce.mean() + rl_weight * pg


# -- the gates ----------------------------------------------------------------------
class SkipGates(nn.Module):
    """SkipNet's recurrent gates for a ResNet of K blocks: one ``Linear(C_in(t), 10)``
    embedding per gated block t = 1..K-1, one LSTM cell (two linear maps) shared by all,
    and a ``Linear(10, 1)`` to the keep logit."""

    def __init__(self, in_channels: Sequence[int], embed: int = EMBED, hidden: int = HIDDEN):
        super().__init__()
        self.in_channels: tuple[int, ...] = tuple(in_channels)
        self.hidden = hidden
        self.embed = nn.ModuleList(nn.Linear(c, embed) for c in self.in_channels[1:])
        self.ih = nn.Linear(embed, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(hidden, 1)

    @property
    def num_blocks(self) -> int:
        return len(self.in_channels)

    @property
    def flops(self) -> int:
        """FLOPs of the K-1 gates per image: every Linear, 2·in·out (pooling is free)."""
        steps = self.num_blocks - 1
        per_step = sum(2 * m.in_features * m.out_features for m in (self.ih, self.hh, self.proj))
        return sum(2 * m.in_features * m.out_features for m in self.embed) + steps * per_step

    def initial_state(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = h.new_zeros((h.shape[0], self.hidden), dtype=self.proj.weight.dtype)
        return zeros, zeros

    def embedding(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """e_t: the embedding of the pooled output of block t-1 (the input of block t)."""
        return self.embed[t - 1](h.mean((2, 3)).to(self.proj.weight.dtype))

    def cell(self, e: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """``(keep logit (B,), new state)`` from the embedding ``e``."""
        z, c = lstm_cell(self.ih(e) + self.hh(state[0]), state[1])
        return self.proj(z).squeeze(1), (z, c)

    def step(self, t: int, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """Gate t (t ≥ 1) on block t's input ``h``: ``(keep logit (B,), new state)``."""
        return self.cell(self.embedding(t, h), state)

    @torch.no_grad()
    def start_keeping(self, prob: float = KEEP_START) -> None:
        """Make every gate keep its block with probability about ``prob`` whatever it
        sees (the projection's weights shrunk, its bias at logit(prob))."""
        self.proj.weight.mul_(0.01)
        self.proj.bias.fill_(math.log(prob / (1 - prob)))

    @torch.no_grad()
    def keep_all(self) -> None:
        """Gates that keep every block (test.py without --load: the full network)."""
        self.proj.weight.zero_()
        self.proj.bias.fill_(30.0)


def build_skip_gates(spec: ModelSpec) -> SkipGates:
    """SkipNet's gates for the base ResNet of ``spec`` (randomly initialised)."""
    with torch.device("meta"):  # only the layout is read
        rnet = build_resnet(spec)
    return SkipGates(block_in_channels(rnet))


class FeedforwardGates(nn.Module):
    """SkipNet's feed-forward gates (the peer's FFGate-II) for a ResNet of K blocks: for
    each gated block t = 1..K-1, ``Conv2d(C, C, 3, stride 2)`` + BatchNorm + ReLU on the
    block's input, global average pooling and ``Linear(C, 1)`` to the keep logit. The peer
    maps to two logits and keeps with probability softmax[1] = σ(l_1 - l_0); one logit is
    the same family of functions. ``in_sizes``: the input resolution of each block (for
    the FLOP count)."""

    def __init__(self, in_channels: Sequence[int], in_sizes: Sequence[int]):
        super().__init__()
        self.in_channels: tuple[int, ...] = tuple(in_channels)
        self.in_sizes: tuple[int, ...] = tuple(in_sizes)
        gated = self.in_channels[1:]
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
                                   for c in gated)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in gated)
        self.proj = nn.ModuleList(nn.Linear(c, 1) for c in gated)

    @property
    def num_blocks(self) -> int:
        return len(self.in_channels)

    @property
    def flops(self) -> int:
        """FLOPs of the K-1 gates per image: the stride-2 convolution (2·9·C²·out²,
        out = ⌈size/2⌉) and the Linear (2·C); BatchNorm, ReLU and pooling are free."""
        total = 0
        for c, size in zip(self.in_channels[1:], self.in_sizes[1:], strict=True):
            out = (size + 1) // 2
            total += 2 * 9 * c * c * out * out + 2 * c
        return total

    def initial_state(self, h: torch.Tensor) -> None:
        return None

    def features(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """The pooled features gate t (t ≥ 1) reads from block t's input ``h``."""
        y = F.relu(self.bns[t - 1](self.convs[t - 1](h)))
        return y.mean((2, 3)).to(self.proj[t - 1].weight.dtype)

    def step(self, t: int, h: torch.Tensor, state: None):
        """Gate t (t ≥ 1) on block t's input ``h``: ``(keep logit (B,), None)``."""
        return self.proj[t - 1](self.features(t, h)).squeeze(1), None

    @torch.no_grad()
    def start_keeping(self, prob: float = KEEP_START) -> None:
        """Make every gate keep its block with probability about ``prob``."""
        for proj in self.proj:
            proj.weight.mul_(0.01)
            proj.bias.fill_(math.log(prob / (1 - prob)))

    @torch.no_grad()
    def keep_all(self) -> None:
        """Gates that keep every block (test.py without --load: the full network)."""
        for proj in self.proj:
            proj.weight.zero_()
            proj.bias.fill_(30.0)


def block_in_sizes(rnet: FlatResNet, image_size: int) -> list[int]:
    """The input resolution of each residual block of ``rnet`` (a shape-only pass)."""
    with torch.no_grad():
        h = rnet.stem(torch.empty(1, 3, image_size, image_size, device="meta"))
        sizes = []
        for t in range(rnet.num_blocks):
            sizes.append(h.shape[-1])
            h = rnet.run_block(t, h, rnet.residual(t, h))
    return sizes


def build_ff_gates(spec: ModelSpec) -> FeedforwardGates:
    """SkipNet's feed-forward gates for the base ResNet of ``spec`` (randomly initialised)."""
    with torch.device("meta"):  # only the layout is read
        rnet = build_resnet(spec)
    return FeedforwardGates(block_in_channels(rnet), block_in_sizes(rnet, spec.image_size))


# -- the interleaved pass -----------------------------------------------------------
@dataclass
class SkipOutput:
    logits: torch.Tensor  # (B, classes)
    gate_logits: torch.Tensor  # (B, K-1) keep logits of gates 1..K-1 (with gradient)
    policy: torch.Tensor  # (B, K) float 0/1 decisions taken (column 0: always 1)


def skip_pass(rnet: FlatResNet, agent: SkipGates, x: torch.Tensor,
              noise: torch.Tensor | None = None, mode: str = "masked",
              threshold: float = TEST_THRESHOLD, straight: bool = False,
              keep_first: int = 0) -> SkipOutput:
    """Gate, then block or skip, block after block.

    ``noise`` (B, K) uniform: block t ≥ 1 is kept where ``noise[:, t] < p_t`` (the HRL
    sample); None: the test rule ``p_t > threshold``, with the straight-through gradient
    of p_t when ``straight`` (SP). Block 0 and the first ``keep_first`` blocks are kept
    whatever the gates say (their gates still run). ``mode``: ``masked`` runs every block
    on every row and selects; ``grouped`` runs each block only on the rows that keep it.
    """
    check_pass(mode, MODES, agent.num_blocks, rnet)
    h = rnet.stem(x)
    state = agent.initial_state(h)
    ones = h.new_ones(h.shape[0], dtype=torch.float32)
    gate_logits, decisions = [], [ones]
    for t in range(rnet.num_blocks):
        keep = ones
        if t > 0:
            logit, state = agent.step(t, h, state)
            logit = logit.float()
            prob = torch.sigmoid(logit)
            gate_logits.append(logit)
            if t < keep_first:
                keep = ones
            elif noise is not None:
                keep = (noise[:, t].to(prob.device) < prob.detach()).float()
            else:
                keep = (prob.detach() > threshold).float()
            decisions.append(keep)
            if straight and noise is None and t >= keep_first:
                keep = keep + (prob - prob.detach())  # exactly 0/1 forward, dp/dθ backward
        residual = rnet.residual(t, h)
        h = run_on_rows(rnet, t, h, residual, keep) if mode == "grouped" else \
            _masked_block(rnet, t, h, residual, keep)
    gates = torch.stack(gate_logits, 1) if gate_logits else ones.new_zeros(len(ones), 0)
    return SkipOutput(rnet.head(h), gates, torch.stack(decisions, 1))


def _masked_block(rnet: FlatResNet, t: int, h: torch.Tensor, residual: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """Every row runs the block; ``keep`` (which may carry a gradient) selects."""
    m = keep.to(h.dtype).view(-1, 1, 1, 1)
    return rnet.run_block(t, h, residual) * m + residual * (1 - m)



class SkipNetPair(JointNet):
    """A ResNet and its SkipNet gates: ``forward(x, noise, straight)`` is the masked
    :func:`skip_pass` (training)."""

    @staticmethod
    def run(rnet: FlatResNet, agent: nn.Module, x: torch.Tensor,
            noise: torch.Tensor | None = None, straight: bool = False) -> SkipOutput:
        return skip_pass(rnet, agent, x, noise, "masked", straight=straight)


# -- training -----------------------------------------------------------------------
def sp_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  amp: str = "none") -> StepOutput:
    """Supervised pre-training: hard decisions, straight-through gradient, cross-entropy.
    The reward logged is the episode's final reward, −CE per image."""
    with autocast(amp, inputs.device):
        out = net(inputs, None, True)
    ce = F.cross_entropy(out.logits.float(), targets, reduction="none")
    return StepOutput(ce.mean(), (out.logits.argmax(1) == targets).float(), out.policy,
                      -ce.detach())


def hrl_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   noise: torch.Tensor, *, alpha: float, rl_weight: float, gamma: float,
                   amp: str = "none") -> StepOutput:
    """Hybrid RL: sampled decisions, REINFORCE on the gates' returns plus cross-entropy
    (which trains the ResNet through the sampled pass). The reward logged is G_1, the
    return of the first gate (the whole episode's reward at γ = 1)."""
    with autocast(amp, inputs.device):
        out = net(inputs, noise)
    logits = out.logits.float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    gated = out.policy[:, 1:]
    returns = discounted_returns(skip_rewards(gated, alpha), -ce.detach(), gamma)
    loss = hrl_loss(out.gate_logits, gated, returns, ce, rl_weight)
    first = returns[:, 0] if returns.shape[1] else -ce.detach()
    return StepOutput(loss, (logits.argmax(1) == targets).float(), out.policy, first)


# -- evaluation ---------------------------------------------------------------------
class SkipSource(PolicySource):
    """SkipNet as a policy source: gates interleaved with the blocks, block t ≥ 1 kept iff
    p_t > T (T = 0.5 by default); block 0 always runs."""

    name = "skipnet"
    one_shot = False

    def __init__(self, agent: SkipGates, threshold: float = TEST_THRESHOLD,
                 batch_mode: str = "grouped"):
        self.agent = agent
        self.policy_flops = agent.flops
        self.threshold = threshold
        self.batch_mode = batch_mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("SkipNet decides while the ResNet runs; use run(rnet, x)")

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-rule decisions. ``dynamic``: each block only on the rows that keep it (at
        batch 1 a dropped block is not computed); ``False``: masked."""
        mode = self.batch_mode if dynamic else "masked"

        def one_chunk(xs, _):
            out = skip_pass(rnet, self.agent, xs, mode=mode, threshold=self.threshold,
                            keep_first=keep_first)
            return out.logits, out.policy
        return in_chunks(rnet, one_chunk, x)


def _bisect_shift(agent: SkipGates, e0: torch.Tensor, direction: torch.Tensor, state,
                  share: float) -> float:
    """The shift s of the embedding along ``direction`` at which the gate keeps about
    ``share`` of the rows (bisection; the share kept grows with s)."""
    lo, hi = -50.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        kept = float((agent.cell(e0 + mid * direction, state)[0] > 0).float().mean())
        lo, hi = (mid, hi) if kept < share else (lo, mid)
    return hi


@torch.no_grad()
def calibrate_gates(agent: SkipGates, rnet: FlatResNet, images: torch.Tensor,
                    keep_fraction: float, generator: torch.Generator) -> None:
    """Make untrained gates look trained: each embedding becomes a random projection of its
    standardised input, and its bias is moved along the direction that raises the keep
    logit until the gate keeps about the share of ``images`` that makes the whole
    network (block 0 included) keep ``keep_fraction`` of its blocks."""
    num = rnet.num_blocks
    share = min(1.0, max(0.0, (keep_fraction * num - 1) / max(num - 1, 1)))
    agent.proj.weight.copy_(torch.randn(agent.proj.weight.shape, generator=generator) * 2.0)
    agent.proj.bias.zero_()
    h = rnet.stem(images)
    state = agent.initial_state(h)
    for t in range(num):
        keep = torch.ones(len(images), device=h.device)
        if t > 0:
            pooled = h.mean((2, 3)).float()
            emb = agent.embed[t - 1]
            w = torch.randn(emb.weight.shape, generator=generator).to(pooled)
            w = w / (pooled.std(0) + 1e-6) / math.sqrt(pooled.shape[1])
            emb.weight.copy_(w)
            emb.bias.copy_(-w @ pooled.mean(0))
            e0 = emb(pooled)
            if t == 1:  # centre the shared output layer on the first gate's logits, so that
                # every gate reaches its share by a shift it can make (the LSTM saturates)
                agent.proj.bias.sub_(agent.cell(e0, state)[0].median())
            with torch.enable_grad():  # the direction in which the mean keep logit rises
                shift = torch.zeros(e0.shape[1], device=e0.device, requires_grad=True)
                grad, = torch.autograd.grad(agent.cell(e0 + shift, state)[0].mean(), shift)
            direction = grad / (grad.norm() + 1e-12)
            hi = _bisect_shift(agent, e0, direction, state, share)
            emb.bias.add_(hi * direction)
            logit, state = agent.cell(emb(pooled), state)
            keep = (torch.sigmoid(logit) > TEST_THRESHOLD).float()
        residual = rnet.residual(t, h)
        h = _masked_block(rnet, t, h, residual, keep)


def _share_cut(margin: torch.Tensor, share: float) -> float:
    """The value above which ``share`` of ``margin`` lies (all of it: below the least;
    none: above the largest)."""
    if share >= 1:
        return float(margin.min()) - 1
    if share <= 0:
        return float(margin.max()) + 1
    return float(torch.quantile(margin, 1.0 - share))


@torch.no_grad()
def calibrate_ff_gates(agent: FeedforwardGates, rnet: FlatResNet, images: torch.Tensor,
                       keep_fraction: float, generator: torch.Generator) -> None:
    """Make untrained feed-forward gates look trained: each gate's linear map becomes a
    random projection of its standardised features, and its bias keeps about the share
    of ``images`` that makes the whole network (block 0 included) keep ``keep_fraction``
    of its blocks."""
    num = rnet.num_blocks
    share = min(1.0, max(0.0, (keep_fraction * num - 1) / max(num - 1, 1)))
    h = rnet.stem(images)
    for t in range(num):
        keep = torch.ones(len(images), device=h.device)
        if t > 0:
            feats = agent.features(t, h).float()
            proj = agent.proj[t - 1]
            w = torch.randn(proj.weight.shape, generator=generator).to(feats)
            w = w / (feats.std(0) + 1e-6) / math.sqrt(feats.shape[1])
            proj.weight.copy_(w)
            proj.bias.fill_(-_share_cut(feats @ w.view(-1), share))
            keep = (agent.step(t, h, None)[0] > 0).float()
        residual = rnet.residual(t, h)
        h = _masked_block(rnet, t, h, residual, keep)


# -- the method ---------------------------------------------------------------------
class SkipDecision(Decision):
    """SkipNet in an exported graph: block 0 always runs; before block t ≥ 1 the recurrent
    gate reads block t's input and carries its LSTM state to the next gate; keep iff
    ``p_t > threshold``."""

    method = "skipnet"

    def __init__(self, agent: nn.Module, threshold: float = TEST_THRESHOLD,
                 method: str = "skipnet"):
        super().__init__()
        self.agent = agent
        self.threshold = threshold
        self.method = method

    def begin(self, x: torch.Tensor) -> dict:
        return {}

    def keep(self, t: int, h: torch.Tensor, state: dict) -> torch.Tensor:
        if t == 0:
            state["lstm"] = self.agent.initial_state(h)
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        logit, state["lstm"] = self.agent.step(t, h, state["lstm"])
        return torch.sigmoid(logit) > self.threshold


class SkipNet(Method):
    """SkipNet (ECCV 2018): recurrent gates decide block by block while the ResNet runs,
    trained by supervised pre-training and hybrid reinforcement learning."""

    name = "skipnet"
    summary = "SkipNet: a shared-LSTM gate before each block reads the previous block's output"
    stages = (FINETUNE,)
    agent_class = SkipGates
    agent_words = "SkipNet gates"
    threshold_help = ("block t >= 1 is kept iff its gate's keep probability p_t > T "
                      "(default 0.5); block 0 always runs")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("skipnet, skipnet_ff (--agent skipnet or "
                                          "skipnet_ff)")
        self.option(group, "--skip_phase", choices=PHASES, default="hrl",
                    help="sp: supervised pre-training (hard gates, straight-through, "
                         "cross-entropy); hrl: hybrid reinforcement learning (default)")
        self.option(group, "--skip_alpha", type=float, default=0.1,
                    help="alpha: reward for skipping, shared by the gates (alpha/N each); "
                         "larger skips more (peer's CIFAR default 0.1)")
        self.option(group, "--skip_rl_weight", type=float, default=0.01,
                    help="weight of the REINFORCE term in the hybrid loss")
        self.option(group, "--skip_gamma", type=float, default=1.0,
                    help="discount of the gates' future rewards, in [0, 1]")

    def check_options(self, args: argparse.Namespace) -> list[str]:
        problems = []
        if not (math.isfinite(args.skip_alpha) and args.skip_alpha >= 0):
            problems.append(f"--skip_alpha must be a finite number >= 0, got {args.skip_alpha}")
        if not (math.isfinite(args.skip_rl_weight) and args.skip_rl_weight > 0):
            problems.append(f"--skip_rl_weight must be a finite number > 0, got "
                            f"{args.skip_rl_weight}")
        if not 0.0 <= args.skip_gamma <= 1.0:
            problems.append(f"--skip_gamma must lie in [0, 1], got {args.skip_gamma}")
        return problems

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_skip_gates(spec)

    def initialise(self, agent: nn.Module, spec: ModelSpec, args: argparse.Namespace,
                   stage: str) -> None:
        """A fresh ``sp`` run keeps the gates' random initialisation, as the peer's SP
        (about half the blocks kept at first); a fresh ``hrl`` run (the peer starts HRL
        from its SP checkpoint instead) starts with gates that keep every block with
        probability 0.9."""
        if getattr(args, "skip_phase", "hrl") == "hrl":
            agent.start_keeping(KEEP_START)

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        """Gates and ResNet as one module (one DDP forward), the masked pass in train mode."""
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        net = wrap(SkipNetPair(rnet, agent), where.device, where.info)
        if args.skip_phase == "sp":
            def sp_step(inputs, targets, noise, cl_step):
                return sp_train_step(net, inputs, targets, amp=args.amp)
            return net, sp_step

        def step(inputs, targets, noise, cl_step):
            return hrl_train_step(net, inputs, targets, noise, alpha=args.skip_alpha,
                                  rl_weight=args.skip_rl_weight, gamma=args.skip_gamma,
                                  amp=args.amp)
        return net, step

    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        calibrate_gates(agent, rnet, images, keep_fraction, generator)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        return SkipDecision(agent, source.threshold, self.name)

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        threshold = self.checked_threshold(threshold)
        return SkipSource(self.checked_agent(spec, agent),
                          TEST_THRESHOLD if threshold is None else threshold)


class SkipNetFF(SkipNet):
    """SkipNet with feed-forward gates (the peer's FFGate-II): the same training and test
    rule as :class:`SkipNet`, and its flags; each gate reads only its block's input."""

    name = "skipnet_ff"
    summary = "SkipNet, feed-forward gates: a stride-2 conv gate before each block"
    options_of = "skipnet"
    agent_class = FeedforwardGates
    agent_words = "SkipNet feed-forward gates"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """The flags are SkipNet's (added once, by that method)."""

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_ff_gates(spec)

    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        calibrate_ff_gates(agent, rnet, images, keep_fraction, generator)


register(SkipNet())
register(SkipNetFF())
