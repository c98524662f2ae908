"""ACT on ResNets: Adaptive Computation Time per block stage (Graves 2016, applied to
residual networks by Figurnov et al., "Spatially Adaptive Computation Time for Residual
Networks", CVPR 2017, Sec. 2, its non-spatial "ACT" model).

Each block stage (the residual blocks between two changes of resolution) is an ACT
module. After block n of a stage of L blocks a halting unit reads the block's output
y_n, global-average-pooled, and gives a halting score

    h_n = sigmoid(W_n · pool(y_n) + b_n),        n = 1..L-1

(the last block needs none: its weight is the remainder). The stage halts at

    N = min{n : h_1 + ... + h_n >= 1 - ε}   (N = L when no such n < L),
    R = 1 - (h_1 + ... + h_{N-1}),
    p_n = h_n for n < N,   p_N = R,   p_n = 0 for n > N,

and passes on the halting-weighted sum of its block outputs, Σ_n p_n · y_n (not the
last block's output). Blocks N+1..L of the stage do not run. Training adds the ponder
cost ρ = Σ_stages (N + R) per image, weighted by τ, to the cross-entropy; N carries no
gradient, R and the p_n do (Graves 2016, Sec. 2; Figurnov et al. 2017, Sec. 2).

The first block of every stage always runs (N >= 1). Decisions are taken while the
network runs, so the source is not one-shot: ``run`` returns the (B, K) blocks
executed. Execution: ``masked`` runs every block of a stage for every image and
weighs the outputs (p_n = 0 after halting: training, and the reference); ``dynamic``
runs block n only on the images still running (gather, block, write back; at batch 1
a stage stops for real). The two give the same logits in eval mode.

FLOPs per image (docs/flops.md): the executed blocks, the stem, stage shortcuts and
classifier from :func:`models.flops.flop_table`, plus the halting units (Linear:
2·C per unit). ``policy_flops`` is a constant per image, so it counts every halting
unit that can run (Σ_stages (L-1)·2·C); :func:`halting_flops` gives the exact count
of an image's executed blocks, which is at most that.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FlatResNet, ModelSpec, build_resnet
from models.dynamic import gather, in_chunks, write_rows
from models.export import ExportedBlockDrop, StageDecision, gather_rows, scatter_rows
from utils.amp import autocast
from utils.dist import wrap

from .method import FINETUNE, JointNet, Method, StepOutput, TrainStep, Where, register
from .rewards import reward
from .source import PolicySource, PolicySourceError, check_pass

DEFAULT_TAU = 0.01  # ponder cost weight: the peer's README runs CIFAR-10 with --tau=0.01
DEFAULT_EPS = 0.01  # ε: the peer's adaptive_computation_time default (eps=1e-2)
INIT_BIAS = -3.0  # the peer's halting bias initialiser: h ≈ 0.05, early halting is rare
MODES = ("masked", "dynamic")


# -- the equations ----------------------------------------------------------------
def halting_distribution(h: torch.Tensor, threshold: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, N, R)`` of one stage from its halting scores ``h`` (B, L-1).

    N (B,) long, 1-based: the first n with ``h_1 + ... + h_n >= threshold``, else L;
    R (B,): ``1 - (h_1 + ... + h_{N-1})``; p (B, L): ``h_n`` for n < N, R at N, 0 after.
    Gradient flows through p and R, not N."""
    batch, units = h.shape
    cum = torch.cumsum(h, 1)
    halts = torch.cat([cum.detach() >= threshold,
                       torch.ones(batch, 1, dtype=torch.bool, device=h.device)], 1)
    first = halts.to(torch.uint8).argmax(1)  # 0-based index of the first halting unit
    before = torch.cat([h.new_zeros(batch, 1), cum], 1)  # Σ_{i<n} h_i for n = 1..L
    remainder = 1 - before.gather(1, first.view(-1, 1)).view(-1)
    index = torch.arange(units + 1, device=h.device).view(1, -1)
    padded = torch.cat([h, h.new_zeros(batch, 1)], 1)
    p = torch.where(index < first.view(-1, 1), padded, torch.zeros_like(padded))
    p = torch.where(index == first.view(-1, 1), remainder.view(-1, 1).expand_as(p), p)
    return p, first + 1, remainder


def ponder_cost(num_units: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """ρ = N + R of one stage, per image (N without gradient)."""
    return num_units.to(remainder.dtype) + remainder


def act_loss(logits: torch.Tensor, targets: torch.Tensor, ponder: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Mean cross-entropy + τ · mean over images of ρ (summed over stages)."""
    return F.cross_entropy(logits, targets) + tau * ponder.mean()


# -- the halting units ------------------------------------------------------------
class HaltingUnits(nn.Module):
    """The halting units of every block stage: ``units[s][n]`` is ``Linear(C_s, 1)`` on
    the pooled output of block n of stage s, for n < L_s - 1. ``eps`` (a buffer, saved in
    checkpoints) is the ε the units were trained with; it sets the default test rule."""

    def __init__(self, layers: Sequence[int], channels: Sequence[int],
                 eps: float = DEFAULT_EPS, init_bias: float = INIT_BIAS):
        super().__init__()
        self.layers: tuple[int, ...] = tuple(layers)
        self.channels: tuple[int, ...] = tuple(channels)
        self.units = nn.ModuleList(
            nn.ModuleList(nn.Linear(c, 1) for _ in range(count - 1))
            for count, c in zip(self.layers, self.channels, strict=True))
        for unit in self.all_units():
            nn.init.constant_(unit.bias, init_bias)
        self.register_buffer("eps", torch.tensor(float(eps)))

    def all_units(self) -> list[nn.Linear]:
        return [u for stage in self.units for u in stage]

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    @property
    def unit_costs(self) -> tuple[int, ...]:
        """FLOPs of the halting unit after each block, flat order (0 for a stage's last
        block, which has none): 2·in·out of a Linear."""
        return tuple(2 * c if n < count - 1 else 0
                     for count, c in zip(self.layers, self.channels, strict=True)
                     for n in range(count))

    @property
    def flops(self) -> int:
        """Every halting unit: the most an image can spend on halting."""
        return sum(self.unit_costs)

    def score(self, s: int, n: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) halting score of block n of stage s from its output ``y``."""
        return torch.sigmoid(self.units[s][n](y.mean((2, 3))).float()).view(-1)


def stage_channels(rnet: FlatResNet) -> list[int]:
    """Output channels of each block stage of ``rnet``."""
    out = []
    for s in range(len(rnet.layers)):
        bns = [m for m in rnet.blocks[s][0].modules() if isinstance(m, nn.BatchNorm2d)]
        out.append(bns[-1].num_features)
    return out


def build_halting_units(spec: ModelSpec, eps: float = DEFAULT_EPS) -> HaltingUnits:
    """Halting units for the base ResNet of ``spec`` (bias -3, weights random)."""
    with torch.device("meta"):  # only the layout is read
        rnet = build_resnet(spec)
    return HaltingUnits(rnet.layers, stage_channels(rnet), eps)


def halting_flops(agent: HaltingUnits, policy: torch.Tensor) -> torch.Tensor:
    """(B,) int64 FLOPs of the halting units the (B, K) executed blocks ran."""
    costs = torch.tensor(agent.unit_costs, dtype=torch.int64, device=policy.device)
    return policy.to(torch.int64) @ costs


# -- the forward pass ---------------------------------------------------------------
@dataclass
class ActOutput:
    logits: torch.Tensor  # (B, classes)
    ponder: torch.Tensor  # (B,) ρ summed over stages (with gradient to the halting units)
    policy: torch.Tensor  # (B, K) float, 1 for the blocks executed


def act_pass(rnet: FlatResNet, agent: HaltingUnits, x: torch.Tensor,
             threshold: float | None = None, mode: str = "masked") -> ActOutput:
    """Stem, one ACT module per block stage, head. ``threshold``: a stage halts once its
    cumulative halting score reaches it (None: 1 - ε of the units)."""
    check_pass(mode, MODES)
    if agent.layers != rnet.layers:
        raise ValueError(f"the halting units are for stages of {agent.layers} blocks, the "
                         f"ResNet has {rnet.layers}")
    if threshold is None:
        threshold = 1.0 - float(agent.eps)
    h = rnet.stem(x)
    ponder = x.new_zeros(x.shape[0], dtype=torch.float32)
    policies, t = [], 0
    for s, count in enumerate(rnet.layers):
        run = _masked_stage if mode == "masked" else _dynamic_stage
        h, rho, executed = run(rnet, agent, s, t, count, h, threshold)
        ponder = ponder + rho
        policies.append(executed)
        t += count
    return ActOutput(rnet.head(h), ponder, torch.cat(policies, 1))


def _masked_stage(rnet, agent, s, t0, count, h, threshold):
    """Every block of the stage for every image; outputs weighed by p (0 after N)."""
    outputs, scores = [], []
    for n in range(count):
        h = rnet.run_block(t0 + n, h, rnet.residual(t0 + n, h))
        outputs.append(h)
        if n < count - 1:
            scores.append(agent.score(s, n, h))
    hs = torch.stack(scores, 1) if scores else h.new_zeros(h.shape[0], 0, dtype=torch.float32)
    p, num, rem = halting_distribution(hs, threshold)
    out = sum(p[:, n].to(y.dtype).view(-1, 1, 1, 1) * y for n, y in enumerate(outputs))
    index = torch.arange(count, device=h.device).view(1, -1)
    return out, ponder_cost(num, rem), (index < num.view(-1, 1)).to(torch.float32)


@torch.no_grad()
def _dynamic_stage(rnet, agent, s, t0, count, h, threshold):
    """Block n runs only on the images whose stage has not halted (one host
    synchronisation per block); equal to :func:`_masked_stage` in eval mode."""
    batch = h.shape[0]
    cum = h.new_zeros(batch, dtype=torch.float32)
    ponder = h.new_zeros(batch, dtype=torch.float32)
    executed = h.new_zeros(batch, count, dtype=torch.float32)
    rows = torch.arange(batch, device=h.device)  # the images still running
    out = None
    for n in range(count):
        y = rnet.run_block(t0 + n, h, rnet.residual(t0 + n, h))
        executed[rows, n] = 1
        before = cum.index_select(0, rows)
        if n < count - 1:
            score = agent.score(s, n, y)
            total = before + score
            halted = total >= threshold
            p = torch.where(halted, 1 - before, score)
        else:
            halted = torch.ones_like(before, dtype=torch.bool)
            p = 1 - before
        weighted = p.to(y.dtype).view(-1, 1, 1, 1) * y
        if out is None:  # the first block runs on every image
            out = weighted
        else:
            out = write_rows(out, rows, gather(out, rows) + weighted)
        ponder.index_add_(0, rows, torch.where(halted, n + 1 + (1 - before),
                                               torch.zeros_like(before)))
        if n == count - 1:
            break
        cum.index_copy_(0, rows, total)
        keep = (~halted).nonzero().view(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < rows.numel():
            rows, y = rows.index_select(0, keep), gather(y, keep)
        h = y
    return out, ponder, executed


# -- the policy source --------------------------------------------------------------
class ActSource(PolicySource):
    """ACT's halting at test time: a stage halts once the cumulative halting score of
    its blocks reaches T (default 1 - ε, ε as trained; T in (0, 1]). Lower T halts
    earlier (fewer blocks); T = 1 runs a stage until its scores sum to 1."""

    name = "act"
    one_shot = False

    def __init__(self, agent: HaltingUnits, threshold: float | None = None):
        self.agent = agent
        self.policy_flops = agent.flops
        self.threshold = threshold

    def decision_flops(self, policy: torch.Tensor) -> torch.Tensor:
        """Only the halting units of the blocks that ran."""
        return halting_flops(self.agent, policy)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("ACT decides while the ResNet runs; use run(rnet, x)")

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Halting as trained; ``dynamic`` skips halted blocks for real (per row at batch
        > 1), ``False`` runs the masked reference. ACT has no curriculum."""
        if keep_first:
            raise PolicySourceError("ACT has no curriculum stage (keep_first must be 0)")
        mode = "dynamic" if dynamic else "masked"

        def one_chunk(xs, _):
            out = act_pass(rnet, self.agent, xs, self.threshold, mode)
            return out.logits, out.policy
        return in_chunks(rnet, one_chunk, x)


class ActNet(JointNet):
    """A ResNet and its halting units: ``forward(x)`` is the masked :func:`act_pass`."""

    @staticmethod
    def run(rnet: FlatResNet, agent: nn.Module, x: torch.Tensor) -> ActOutput:
        return act_pass(rnet, agent, x, mode="masked")


def act_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                   tau: float, penalty: float, amp: str = "none") -> StepOutput:
    """One masked pass (every block runs, outputs weighed by the halting distribution)
    through ``net`` (an :class:`ActNet`, possibly DDP-wrapped); loss = CE + τ·mean ρ.
    The logged reward is BlockDrop's Eq. 3 under the executed blocks, as at test time."""
    with autocast(amp, inputs.device):
        out = net(inputs)
    logits = out.logits.float()
    loss = act_loss(logits, targets, out.ponder, tau)
    with torch.no_grad():
        rew, match = reward(logits, targets, out.policy, penalty)
    return StepOutput(loss, match, out.policy.detach(), rew)


# -- calibration (the benchmark times methods on random weights) ----------------------
@torch.no_grad()
def calibrate_halting(agent: HaltingUnits, rnet: FlatResNet, images: torch.Tensor,
                      keep_fraction: float, generator: torch.Generator) -> None:
    """Make random halting units look trained: unit n of stage s becomes a random
    projection of its standardised pooled input, and one bias per stage (bisection) makes
    the stage run about ``keep_fraction`` of its blocks on ``images``."""
    threshold = 1.0 - float(agent.eps)
    h, t0 = rnet.stem(images), 0
    for s, count in enumerate(rnet.layers):
        outputs = []
        y = h
        for n in range(count):
            y = rnet.run_block(t0 + n, y, rnet.residual(t0 + n, y))
            outputs.append(y)
        pooled = [o.mean((2, 3)) for o in outputs[:-1]]
        projections, centres = [], []
        for unit, feats in zip(agent.units[s], pooled, strict=True):
            sd = feats.std(0) + 1e-6
            w = torch.randn(feats.shape[1], generator=generator).to(feats) / sd
            w = w / feats.shape[1] ** 0.5  # logits of about unit spread over the images
            unit.weight.copy_(w.view(1, -1))
            projection = feats @ w
            centres.append(float(projection.mean()))
            projections.append(projection - centres[-1])
        if projections:
            margins = torch.stack(projections, 1).float()
            target = min(max(keep_fraction * count, 1.0), float(count))
            lo, hi = -30.0, 30.0  # bias shift: higher halts earlier
            for _ in range(50):
                mid = (lo + hi) / 2
                _, num, _ = halting_distribution(torch.sigmoid(margins + mid), threshold)
                if float(num.float().mean()) > target:
                    lo = mid
                else:
                    hi = mid
            shift = (lo + hi) / 2
            for unit, centre in zip(agent.units[s], centres, strict=True):
                unit.bias.fill_(shift - centre)
            scores = torch.stack([agent.score(s, n, outputs[n]) for n in range(count - 1)], 1)
        else:
            scores = h.new_zeros(h.shape[0], 0)
        p, _, _ = halting_distribution(scores, threshold)
        h = sum(p[:, n].to(o.dtype).view(-1, 1, 1, 1) * o for n, o in enumerate(outputs))
        t0 += count


# -- the exported graph (models.export, docs/export.md) -------------------------------
class ActDecision(StageDecision):
    """ACT in an exported graph: each block stage runs as :func:`_dynamic_stage` does,
    with the threshold baked in. The first block runs on every image; block n > 1 runs
    on the rows whose stage has not halted, gathered from the previous block's output;
    the halting-weighted output ``p_n · y_n`` is added into the stage output at those
    rows. A stage all of whose images halted runs its remaining blocks on 0 rows."""

    method = "act"

    def __init__(self, agent: HaltingUnits, threshold: float):
        super().__init__()
        self.agent = agent
        self.threshold = float(threshold)
        self.block_flops = agent.unit_costs

    def run_stage(self, net: ExportedBlockDrop, s: int, blocks: range,
                  h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch, last = h.shape[0], len(blocks) - 1
        y = net.run_block(blocks[0], h, net.rnet.residual(blocks[0], h))
        ran = [torch.ones(batch, dtype=torch.bool, device=h.device)]
        if last == 0:
            return y, ran
        score = self.agent.score(s, 0, y)  # Σ_{i<1} h_i = 0: p_1 = 1 where block 1 halts
        halted = score >= self.threshold
        out = _weigh(torch.where(halted, torch.ones_like(score), score), y)
        rows = torch.nonzero(~halted).reshape(-1)  # the images still running
        h, cum = gather_rows(y, rows), gather_rows(score, rows)
        for n in range(1, last):
            ran.append(_marked(rows, batch))
            y = net.run_block(blocks[n], h, h)
            score = self.agent.score(s, n, y)
            total = cum + score
            halted = total >= self.threshold
            out = _add_rows(out, rows, _weigh(torch.where(halted, 1 - cum, score), y))
            keep = torch.nonzero(~halted).reshape(-1)
            rows, h, cum = gather_rows(rows, keep), gather_rows(y, keep), gather_rows(total, keep)
        ran.append(_marked(rows, batch))
        y = net.run_block(blocks[last], h, h)
        return _add_rows(out, rows, _weigh(1 - cum, y)), ran  # the last block: the remainder


def _weigh(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p_n · y_n``: the (n,) halting weights times the (n, C, H, W) block outputs."""
    return p.to(y.dtype).reshape(-1, 1, 1, 1) * y


def _add_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out`` with ``values`` added at its rows ``rows``."""
    return scatter_rows(out, rows, gather_rows(out, rows) + values)


def _marked(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch,) bool, true at ``rows`` (scattered as a column: the exporter writes a 1-d
    ``index_copy`` with an untyped attribute and warns)."""
    ones = torch.ones(rows.shape[0], 1, dtype=torch.bool, device=rows.device)
    return scatter_rows(torch.zeros(batch, 1, dtype=torch.bool, device=rows.device), rows,
                        ones)[:, 0]


# -- the method ---------------------------------------------------------------------
class Act(Method):
    """ACT (Graves 2016) on the ResNet's block stages, as in Figurnov et al. 2017 (Sec. 2):
    halting units after the blocks, a halting-weighted stage output and a ponder cost.

    ``--threshold T`` (test time): a stage halts once the cumulative halting score of its
    blocks reaches T, in (0, 1]; the default is 1 - ε with the ε the units were trained
    with (``--act_eps``)."""

    name = "act"
    agent_class = HaltingUnits
    agent_words = "ACT halting units"
    threshold_low_open = True
    summary = "ACT: halting units per block stage, ponder cost (Figurnov et al. 2017)"
    stages = (FINETUNE,)
    threshold_help = ("a block stage halts once its cumulative halting score reaches T, in "
                      "(0, 1] (default 1 - eps as trained)")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("act (--agent act)")
        self.option(group, "--act_tau", type=float, default=DEFAULT_TAU,
                    help="tau, the weight of the ponder cost (N + R summed over the block "
                         f"stages) in the loss; >= 0 (default {DEFAULT_TAU})")
        self.option(group, "--act_eps", type=float, default=DEFAULT_EPS,
                    help="epsilon: a stage halts once its halting scores sum to 1 - eps; in "
                         f"(0, 1) (default {DEFAULT_EPS})")

    def check_options(self, args: argparse.Namespace) -> list[str]:
        problems = []
        tau = getattr(args, "act_tau", DEFAULT_TAU)
        eps = getattr(args, "act_eps", DEFAULT_EPS)
        if not (tau >= 0 and tau < float("inf")):
            problems.append(f"--act_tau must be a finite number >= 0, got {tau}")
        if not 0.0 < eps < 1.0:
            problems.append(f"--act_eps must lie in (0, 1), got {eps}")
        return problems

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_halting_units(spec)

    def prepare(self, stage: str, rnet: FlatResNet, agent: nn.Module | None,
                args: argparse.Namespace, spec: ModelSpec) -> None:
        """The ε of this run goes into the units (and their checkpoints)."""
        if isinstance(agent, HaltingUnits):
            agent.eps.fill_(float(getattr(args, "act_eps", DEFAULT_EPS)))

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        net = wrap(ActNet(rnet, agent), where.device, where.info)

        def step(inputs, targets, noise, cl_step):
            return act_train_step(net, inputs, targets, tau=args.act_tau,
                                  penalty=args.penalty, amp=args.amp)
        return net, step

    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        calibrate_halting(agent, rnet, images, keep_fraction, generator)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        """Each block stage as ACT runs it, at the source's threshold (default 1 - ε)."""
        threshold = source.threshold
        if threshold is None:
            threshold = 1.0 - float(agent.eps)
        return ActDecision(agent, threshold)

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        return ActSource(self.checked_agent(spec, agent), self.checked_threshold(threshold))


register(Act())
