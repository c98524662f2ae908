"""BlockDrop-seq, the sequential variant of the supplement ("Ours-seq", Table 2).

Before residual block i a per-block linear gate looks at the global-average-pooled
output of block i-1 (the stem's output for block 0) and gives a softmax over
{drop, keep}:

    p_i = softmax(W_i · pool(y_{i-1}) + b_i),   s_i = p_i[keep].

Decisions are taken one block at a time while the ResNet runs. In training block
i is kept with probability ``s'_i = α·s_i + (1-α)·(1-s_i)`` (the bounded sampling
of BlockDrop, Sec. 3.3); at test time the decision is the argmax of p_i
(keep iff ``p_keep > p_drop``), and the block is then run or skipped.
Training uses the reward, self-critical baseline and curriculum of BlockDrop
(:mod:`policies.rewards`) for the ``cl`` and ``finetune`` stages.

The gates read the ResNet's activations without passing gradient back into it
(``pool(y).detach()``): as in BlockDrop the policy-gradient term trains the
policy and the cross-entropy trains the ResNet.

Execution: ``masked`` runs every block on every image and selects block output
or residual per image (training, and no host synchronisation); ``grouped`` runs
each block only on the rows that keep it (gather, block, write back), one host
synchronisation per block. At batch 1 ``grouped`` really skips the block.
"""
from __future__ import annotations

import argparse
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

from .method import CURRICULUM, FINETUNE, JointNet, Method, StepOutput, TrainStep, Where, register
from .rewards import (advantage, bounded_probs, curriculum_loss, curriculum_mask, finetune_loss,
                      reward)
from .source import PolicySource, check_pass

MODES = ("masked", "grouped")
# the eval-mode execution for batches of more than one image (chosen by measurement,
# see docs/policies.md and ``python -m scripts.benchmark --parts seq``)
DEFAULT_BATCH_MODE = "grouped"


class SeqAgent(nn.Module):
    """The gates of BlockDrop-seq: one ``Linear(C_in(i), 2)`` per residual block, where
    ``C_in(i)`` is the channel count of block i's input."""

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



def block_in_channels(rnet: FlatResNet) -> list[int]:
    """The input channels of each residual block of ``rnet``, in flat order."""
    return [rnet.block(t).conv1.in_channels for t in range(rnet.num_blocks)]


def build_seq_agent(spec) -> SeqAgent:
    """BlockDrop-seq gates for the base ResNet of ``spec`` (randomly initialised)."""
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
             mode: str = "masked", threshold: float | None = None) -> SeqOutput:
    """The interleaved pass: gate, then block or skip, block after block.

    ``noise`` (B, K) uniform samples: block t is kept where ``noise[:, t] < s'_t``;
    None takes the greedy (argmax) decision, or ``s_t >= threshold`` when one is given.
    The first ``keep_first`` blocks are kept whatever the gates say (curriculum learning,
    Alg. 1); their gates still run.
    """
    check_pass(mode, MODES, agent.num_blocks, rnet)
    h = rnet.stem(x)
    probs, decisions = [], []
    for t in range(rnet.num_blocks):
        logits = agent.gate_logits(t, h)
        s = F.softmax(logits.float(), dim=1)[:, 1]
        if t < keep_first:
            keep = torch.ones_like(s)
        elif noise is None and threshold is not None:
            keep = (s >= threshold).to(s.dtype)
        elif noise is None:
            keep = (logits[:, 1] > logits[:, 0]).to(s.dtype)
        else:
            keep = (noise[:, t].to(s.device) < bounded_probs(s.detach(), alpha)).to(s.dtype)
        residual = rnet.residual(t, h)
        h = run_on_rows(rnet, t, h, residual, keep) if mode == "grouped" else \
            _masked_block(rnet, t, h, residual, keep)
        probs.append(s)
        decisions.append(keep)
    return SeqOutput(rnet.head(h), torch.stack(probs, 1), torch.stack(decisions, 1))


def _masked_block(rnet: FlatResNet, t: int, h: torch.Tensor, residual: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """Every image runs the block; the decision selects output or residual."""
    m = keep.to(h.dtype).view(-1, 1, 1, 1)
    return rnet.run_block(t, h, residual) * m + residual * (1 - m)



class SeqSource(PolicySource):
    """BlockDrop-seq as a policy source: greedy gates interleaved with the blocks."""

    name = "seq"
    one_shot = False

    def __init__(self, agent: SeqAgent, batch_mode: str = DEFAULT_BATCH_MODE,
                 threshold: float | None = None):
        self.agent = agent
        self.policy_flops = agent.flops
        self.batch_mode = batch_mode
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("BlockDrop-seq decides while the ResNet runs; use run(rnet, x)")

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decisions. ``dynamic``: batch 1 skips for real, larger batches run
        ``batch_mode``; ``False`` runs masked."""
        mode = "masked"
        if dynamic:
            mode = "grouped" if x.shape[0] == 1 else self.batch_mode

        def one_chunk(xs, _):
            out = seq_pass(rnet, self.agent, xs, keep_first=keep_first, mode=mode,
                           threshold=self.threshold)
            return out.logits, out.policy
        return in_chunks(rnet, one_chunk, x)


class SeqNet(JointNet):
    """A ResNet and its BlockDrop-seq gates: ``forward(x, noise, alpha, keep_first, mode)``
    is :func:`seq_pass`."""

    run = staticmethod(seq_pass)


def seq_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   noise: torch.Tensor, *, alpha: float, penalty: float,
                   beta: float | None = None, cl_step: int | None = None,
                   mode: str = "masked", world_size: int = 1, amp: str = "none") -> StepOutput:
    """A greedy pass without gradient (the self-critical baseline), then a pass whose
    decisions are sampled block by block, both through ``net`` (a :class:`SeqNet`,
    possibly DDP-wrapped). Eq. 3 rewards, Eq. 6 advantage; ``beta`` given: the
    curriculum loss (the first ``K − cl_step`` blocks kept and masked out), else the
    joint-finetuning loss."""
    num_blocks = noise.shape[1]
    keep_first = 0 if cl_step is None or cl_step >= num_blocks else num_blocks - cl_step
    with autocast(amp, inputs.device):
        with torch.no_grad():
            greedy = net(inputs, None, alpha, keep_first, mode)
        sampled = net(inputs, noise, alpha, keep_first, mode)
    reward_greedy, _ = reward(greedy.logits.float(), targets, greedy.policy, penalty)
    reward_sampled, match = reward(sampled.logits.float(), targets, sampled.policy, penalty)
    adv = advantage(reward_sampled, reward_greedy)
    bprobs = bounded_probs(sampled.probs.float(), alpha)
    if beta is None:
        loss = finetune_loss(bprobs, sampled.policy, adv, sampled.logits.float(), targets,
                             sum_scale=world_size)
    else:
        mask = curriculum_mask(len(inputs), num_blocks, num_blocks - keep_first, inputs.device)
        loss = curriculum_loss(bprobs, sampled.policy, adv, mask, beta)
    return StepOutput(loss, match, sampled.policy, reward_sampled)


class SeqDecision(Decision):
    """BlockDrop-seq in an exported graph: before block t, gate t reads the
    global-average-pooled input of block t; keep iff ``logit_keep > logit_drop`` (or
    ``s_t >= threshold``)."""

    method = "seq"

    def __init__(self, agent: SeqAgent, threshold: float | None = None):
        super().__init__()
        self.agent = agent
        self.threshold = threshold

    def keep(self, t: int, h: torch.Tensor, state) -> torch.Tensor:
        logits = self.agent.gates[t](h.mean((2, 3)))
        if self.threshold is not None:
            return F.softmax(logits, dim=1)[:, 1] >= self.threshold
        return logits[:, 1] > logits[:, 0]


class BlockDropSeq(Method):
    """BlockDrop-seq (supplement, Table 2): gates decide block by block while the
    ResNet runs."""

    name = "seq"
    agent_class = SeqAgent
    agent_words = "BlockDrop-seq gates"
    summary = "BlockDrop-seq: per-block linear gates on the previous block's output"
    threshold_help = "block t is kept iff its gate's keep probability >= T (default 0.5)"

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_seq_agent(spec)

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        """Gates and ResNet as one module (one DDP forward); curriculum learning runs the
        frozen ResNet grouped unless ``--masked``, finetuning masked in train mode."""
        if stage not in (CURRICULUM, FINETUNE):
            return super().train_step(stage, args, rnet, agent, where)
        ddp_net = wrap(SeqNet(rnet, agent), where.device, where.info)
        if stage == CURRICULUM:
            mode = "masked" if args.masked else "grouped"

            def step(inputs, targets, noise, cl_step):
                return seq_train_step(ddp_net, inputs, targets, noise, alpha=args.alpha,
                                      penalty=args.penalty, beta=args.beta, cl_step=cl_step,
                                      mode=mode, amp=args.amp)
            return ddp_net, step

        def ft_step(inputs, targets, noise, cl_step):
            return seq_train_step(ddp_net, inputs, targets, noise, alpha=args.alpha,
                                  penalty=args.penalty, world_size=where.info.world_size,
                                  amp=args.amp)
        return ddp_net, ft_step

    @torch.no_grad()
    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        """Gate t becomes a random projection of its standardised input, with the bias set
        so that it keeps block t for about ``keep_fraction`` of ``images`` (decisions then
        vary from image to image)."""
        h = rnet.stem(images)
        for t, gate in enumerate(agent.gates):
            pooled = h.mean((2, 3))
            sd = pooled.std(0) + 1e-6
            w = torch.randn(2, pooled.shape[1], generator=generator).to(pooled) / sd
            margin = pooled @ (w[1] - w[0])
            cut = torch.quantile(margin.double(), 1.0 - keep_fraction).to(margin)
            gate.weight.copy_(w)
            gate.bias.copy_(torch.stack([cut, torch.zeros_like(cut)]))
            keep = (gate(pooled).argmax(1) == 1).to(h.dtype).view(-1, 1, 1, 1)
            residual = rnet.residual(t, h)
            h = rnet.run_block(t, h, residual) * keep + residual * (1 - keep)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        return SeqDecision(agent, source.threshold)

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        return SeqSource(self.checked_agent(spec, agent),
                         threshold=self.checked_threshold(threshold))


register(BlockDropSeq())
