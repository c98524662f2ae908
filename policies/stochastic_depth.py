"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, ECCV 2016) as a training regime.

The ResNet alone is finetuned; while it trains, residual block l (1-based, of L)
survives with probability

    p_l = 1 - (l / L) (1 - p_L)                                   (Eq. 4)

(the flat block index is t = l - 1) and a dropped block passes its residual on
(the identity, or the stage shortcut of a block that changes resolution). The
draw is per image: image i keeps block t iff ``noise[i, t] < p_t``, with the
step's keyed noise, so a resumed or a multi-process run draws the same blocks for
the same image. A surviving block's output is divided by p_l while training
("inverted" scaling), so the test-time network is the plain ResNet; the paper
instead trains unscaled and multiplies F by p_l at test time (Eq. 5).

At test time every block runs (the paper's rule): the checkpoint records a fixed
policy named ``stochastic_depth`` that keeps all K blocks, which test.py
evaluates with no flags; ``--policy firstk|distributek|everyother --k K`` evaluates
the same ResNet under a static policy. docs/methods.md ("Stochastic depth") asks
what this comparison answers.

Execution of a training pass (:func:`sd_pass`): ``grouped`` runs each block only on
the rows that keep it (gather, block, write back), so a dropped block neither
computes nor sees the images that drop it, BatchNorm included; ``masked`` runs
every block on every row and selects (the reference the tests compare against).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FlatResNet, ModelSpec
from models.dynamic import gather, write_rows
from models.export import FixedDecision
from utils.amp import autocast
from utils.dist import wrap

from .fixed import FixedSource
from .method import FINETUNE, Method, StepOutput, TrainStep, Where, register
from .source import PolicySource, PolicySourceError, check_pass

NAME = "stochastic_depth"
MODES = ("masked", "grouped")
PAPER_P_LAST = 0.5  # the paper's p_L (Sec. 4; the authors' README runs -deathRate 0.5)


# -- the method's equations ------------------------------------------------------
def survival_probabilities(num_blocks: int, p_last: float) -> list[float]:
    """Eq. 4: ``p_l = 1 - (l / L)(1 - p_L)`` for l = 1..L, as a list indexed by t = l - 1."""
    return [1.0 - (depth / num_blocks) * (1.0 - p_last) for depth in range(1, num_blocks + 1)]


def expected_blocks(num_blocks: int, p_last: float) -> float:
    """The expected number of blocks a training pass runs, ``sum_l p_l`` (Sec. 3,
    expected network depth): ``L - (1 - p_L)(L + 1)/2``."""
    return sum(survival_probabilities(num_blocks, p_last))


def survival_draw(noise: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """(B, K) float 0/1: image i keeps block t iff ``noise[i, t] < p_t`` (Bernoulli b_l of
    Eq. 2, one draw per image and block)."""
    p = torch.as_tensor(list(probs), dtype=noise.dtype, device=noise.device)
    return (noise < p).to(torch.float32)


def check_p_last(value: Any) -> list[str]:
    """Problems with ``--stochastic_depth P`` (P = p_L must lie in (0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        return [f"--stochastic_depth P is the survival probability of the last block and must "
                f"lie in (0, 1], got {value}"]
    return []


# -- execution of a training pass ---------------------------------------------------
class StochasticDepthNet(nn.Module):
    """The ResNet under stochastic depth as one module, so a training step is one
    ``forward`` (which DistributedDataParallel needs)."""

    def __init__(self, rnet: FlatResNet, probs: Sequence[float]):
        super().__init__()
        self.rnet = rnet
        self.probs = [float(p) for p in probs]

    def forward(self, x: torch.Tensor, keep: torch.Tensor, mode: str = "grouped") -> torch.Tensor:
        return sd_pass(self.rnet, x, keep, self.probs, mode)


def sd_pass(rnet: FlatResNet, x: torch.Tensor, keep: torch.Tensor, probs: Sequence[float],
            mode: str = "grouped") -> torch.Tensor:
    """Logits of ``x`` where row i runs block t iff ``keep[i, t]`` and a kept block adds
    ``F(x) / p_t`` (inverted scaling): ``relu(residual + F(x) / p_t)``; a dropped block
    passes ``residual`` on. ``mode`` (module docstring): ``grouped`` or ``masked``."""
    check_pass(mode, MODES)
    if keep.dim() != 2 or keep.shape != (x.shape[0], rnet.num_blocks):
        raise ValueError(f"keep must have shape ({x.shape[0]}, {rnet.num_blocks}), "
                         f"got {tuple(keep.shape)}")
    if len(probs) != rnet.num_blocks:
        raise ValueError(f"{len(probs)} survival probabilities for {rnet.num_blocks} blocks")
    host = keep.detach().cpu().bool()  # one host transfer for the whole pass
    counts = host.sum(0).tolist()
    h = rnet.stem(x)
    for t in range(rnet.num_blocks):
        residual = rnet.residual(t, h)
        n = counts[t]
        if n == 0:
            h = residual
        elif mode == "masked":
            m = keep[:, t].to(h.dtype).view(-1, 1, 1, 1)
            h = _kept(rnet, t, h, residual, probs[t]) * m + residual * (1 - m)
        elif n == h.shape[0]:
            h = _kept(rnet, t, h, residual, probs[t])
        else:
            rows = host[:, t].nonzero().view(-1).to(h.device)
            hs = gather(h, rows)
            res = hs if residual is h else gather(residual, rows)
            h = write_rows(residual, rows, _kept(rnet, t, hs, res, probs[t]))
    return rnet.head(h)


def _kept(rnet: FlatResNet, t: int, x: torch.Tensor, residual: torch.Tensor,
          p: float) -> torch.Tensor:
    """A surviving block in training: ``relu(residual + F(x) / p)``."""
    out = rnet.block(t)(x)
    if p != 1.0:
        out = out / p
    return F.relu(residual + out)


def sd_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  noise: torch.Tensor, probs: Sequence[float], mode: str = "grouped",
                  amp: str = "none") -> StepOutput:
    """Cross-entropy of the ResNet with the blocks each image's draw keeps; ``net`` is a
    :class:`StochasticDepthNet` (possibly DDP-wrapped). The policy in the output is the
    draw (the epoch log's block usage is the training depth)."""
    keep = survival_draw(noise, probs).to(inputs.device)
    with autocast(amp, inputs.device):
        logits = net(inputs, keep, mode)
    loss = F.cross_entropy(logits.float(), targets)
    return StepOutput(loss, (logits.argmax(1) == targets).float(), keep,
                      torch.zeros(len(inputs), device=inputs.device))


# -- the method ------------------------------------------------------------------------
class StochasticDepth(Method):
    """Stochastic depth: the ResNet finetuned with blocks dropped at random (Eq. 4),
    evaluated with every block (or under a static ``--policy``).

    ``source(spec, k=, threshold=)``: ``threshold=None`` keeps every block (the paper's
    test rule). A float T keeps block l iff its survival probability under Eq. 4 with
    the paper's p_L = 0.5 is at least T, i.e. a static cut of the blocks training
    dropped most often (the source does not know a checkpoint's own P); T must leave
    at least block 1, so it lies in [0, 1 - 0.5/L]. ``k`` must be None or K.
    """

    name = NAME
    summary = "stochastic depth: the ResNet trained with blocks dropped at random, tested whole"
    learned = False
    stages = (FINETUNE,)
    selected_by = "stochastic_depth"
    threshold_help = ("block l is kept iff its survival probability 1 - (l/L)(1 - 0.5) >= T "
                      "(default: every block)")

    def __init__(self) -> None:
        super().__init__()
        self.p_last: float | None = None  # P of the run being trained (for ``record``)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "stochastic depth (--stochastic_depth P; finetune.py, the ResNet alone)")
        self.option(group, "--stochastic_depth", type=float, default=None, metavar="P",
                    help="train the ResNet with stochastic depth: block l of L survives with "
                         "probability 1 - (l/L)(1 - P), P in (0, 1] (the paper: 0.5); "
                         "tested with every block")

    def check_options(self, args: argparse.Namespace) -> list[str]:
        value = getattr(args, "stochastic_depth", None)
        if value is None:
            return [f"{NAME} is chosen by --stochastic_depth P (0 < P <= 1), not by --policy "
                    f"{NAME}"]
        problems = check_p_last(value)
        if not hasattr(args, "policy"):  # cl_training.py trains a deciding network
            return problems + ["--stochastic_depth trains the ResNet alone, in finetune.py; "
                               "cl_training.py trains a policy (leave it out)"]
        regime = ("--stochastic_depth trains the ResNet alone under random depth, a different "
                  "regime from")
        if args.policy == NAME:
            problems.append(f"give --stochastic_depth P alone, without --policy {NAME}")
        elif args.policy is not None:
            problems.append(f"{regime} --policy {args.policy} (a fixed policy); give one of them")
        from .registry import DEFAULT_METHOD  # the registry imports this module
        if getattr(args, "agent", DEFAULT_METHOD) != DEFAULT_METHOD:
            problems.append(f"{regime} --agent {args.agent} (a learned policy); give one of "
                            f"them")
        if getattr(args, "pretrained", None):
            problems.append(f"{regime} a --pretrained policy; leave it out")
        return problems

    def trained_modules(self, stage: str, rnet: FlatResNet,
                        agent: nn.Module | None) -> dict[str, nn.Module]:
        return {"resnet": rnet}

    def prepare(self, stage: str, rnet: FlatResNet, agent: nn.Module | None,
                args: argparse.Namespace, spec: ModelSpec) -> None:
        self.p_last = float(args.stochastic_depth)

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        self.p_last = float(args.stochastic_depth)
        probs = survival_probabilities(rnet.num_blocks, self.p_last)
        net = wrap(StochasticDepthNet(rnet, probs), where.device, where.info)

        def step(inputs, targets, noise, cl_step):
            return sd_train_step(net, inputs, targets, noise, probs, amp=args.amp)
        return net, step

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        return survival_source(spec.num_blocks, PAPER_P_LAST, k=k, threshold=threshold)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        """The trained ResNet as a static network (every block, or those the threshold
        keeps)."""
        return FixedDecision(source.name, source.vector)

    def record(self, source: PolicySource) -> dict[str, Any]:
        return {"fixed_policy": {"name": NAME, "k": source.k, "seed": 0},
                NAME: self.p_last}


def survival_source(num_blocks: int, p_last: float = PAPER_P_LAST, *, k: int | None = None,
                    threshold: float | None = None) -> FixedSource:
    """The test-time policy: every block (``threshold=None``), or the blocks whose survival
    probability (Eq. 4 with ``p_last``) is at least ``threshold``."""
    if k is not None and k != num_blocks:
        raise PolicySourceError(f"{NAME} keeps every block at test time (k = {num_blocks}), "
                                f"got --k {k}; evaluate its ResNet under a static policy with "
                                f"--policy firstk|distributek|everyother --k K")
    if threshold is None:
        return FixedSource(NAME, torch.ones(num_blocks))
    probs = survival_probabilities(num_blocks, p_last)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not 0.0 <= threshold <= probs[0]:
        raise PolicySourceError(f"--threshold for {NAME} must lie in [0, {probs[0]:.4g}] (block 1 "
                                f"survives with p_1 = {probs[0]:.4g}), got {threshold}")
    return FixedSource(NAME, torch.tensor([float(p >= threshold) for p in probs]))


register(StochasticDepth())
