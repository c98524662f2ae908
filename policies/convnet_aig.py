"""ConvNet-AIG: adaptive inference graphs (Veit & Belongie, ECCV 2018; docs/methods.md).

Before residual block l a small gate reads the block's input h (the previous
block's output, the stem's for block 0) and gives two logits over {drop, keep}
(the paper's Sec. 3, "estimating relevance"):

    β_l(h) = W2 · ReLU(BN(W1 · pool(h) + b1)) + b2,   W1: C_in(l) -> 16, W2: 16 -> 2,

with ``pool`` the global average pooling and BN a BatchNorm1d over the 16 hidden units
(16 as in the authors' code). The gates decide block by block while the ResNet runs.

Training (the ``finetune`` stage, gates and ResNet together) samples each gate with
the straight-through Gumbel-softmax: the forward pass takes the hard one-hot argmax of
``(β_l + g) / τ`` (g: two Gumbel(0, 1) samples), the backward pass the gradient of the
soft sample ``softmax((β_l + g) / τ)``. Over two classes only the difference of the two
Gumbel samples matters, and that difference is Logistic(0, 1): ``logit(u)`` for one
uniform u. So the keep component of the sample is

    soft: z_l = σ((β_l[keep] − β_l[drop] + logit(u)) / τ),
    hard: z_l = 1[β_l[keep] − β_l[drop] + logit(u) > 0],

which uses exactly the step's keyed (B, K) noise (``utils.seeding.keyed_uniform``) and
resumes bit for bit. The loss is the cross-entropy plus the target-rate loss

    L_target = λ · (1/L) Σ_l (z̄_l − t)²,   z̄_l = mean over the batch of z_l,

with the authors' scaling (``--aig_loss_weight`` λ = 2 and the mean over the L gates of
their CIFAR ``train.py``). A kept block outputs ``relu(residual + F(h))``, a dropped one
its ``residual``; in training the output is ``z·relu(residual + F(h)) + (1 − z)·residual``,
so the gradient of z reaches the gates. The gates read h with its gradient,
as in the authors' code (the ResNet also learns from the gates' loss).

At test time the gate is deterministic: block l runs iff β_l[keep] > β_l[drop] (the
argmax); a threshold T keeps it iff its softmax keep-probability is at least T. The
gates' BatchNorm then uses its running statistics, so a gate's decision for an image does
not depend on the other images of the batch, and running each block only on the rows
that keep it gives what the masked pass gives.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FlatResNet, ModelSpec, build_resnet, get_spec
from models.dynamic import in_chunks, run_on_rows
from models.export import Decision
from utils.amp import autocast
from utils.dist import unwrap, wrap

from .method import FINETUNE, JointNet, Method, StepOutput, TrainStep, Where, register
from .source import PolicySource, check_pass

HIDDEN = 16  # the gate's hidden units (authors' code: fc1 to 16 channels)
# the authors' initial bias of the gate's last layer, (drop, keep): about 85% kept at start
INIT_BIAS = (0.1, 2.0)
INIT_STD = 0.001  # the authors' initial std of the gate's last weights
# uniform noise is clamped to [EPS, 1 - EPS] before logit(u) (finite logistic noise)
EPS = 1e-6
DEFAULT_TARGET = 0.6  # authors' train.py (CIFAR-10, ResNet-110)
DEFAULT_LOSS_WEIGHT = 2.0  # authors' train.py --lossfact (CIFAR)
DEFAULT_TEMPERATURE = 1.0  # authors' train.py: fixed at 1
MODES = ("masked", "grouped")


# -- the method's equations ---------------------------------------------------------
def logistic_noise(noise: torch.Tensor) -> torch.Tensor:
    """``logit(u)``: the difference of two Gumbel(0, 1) samples, from uniforms ``u``
    (clamped to [EPS, 1 − EPS])."""
    u = noise.clamp(EPS, 1.0 - EPS)
    return torch.log(u) - torch.log1p(-u)


def gumbel_gate(logits: torch.Tensor, noise: torch.Tensor,
                temperature: float = DEFAULT_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel-softmax over {drop, keep} (module docstring).

    ``logits`` (B, 2), ``noise`` (B,) uniform. Returns ``(z, soft)``: z (B,) is the hard
    0/1 keep decision forward and has the soft sample's gradient backward; soft (B,) is
    the keep component of ``softmax((logits + g) / τ)``."""
    margin = logits[:, 1] - logits[:, 0] + logistic_noise(noise.to(logits))
    soft = torch.sigmoid(margin / temperature)
    hard = (margin > 0).to(soft.dtype)
    return hard + (soft - soft.detach()), soft  # exactly 0/1 forward (x - x = 0)


def target_rate_loss(gates: torch.Tensor, target: float) -> torch.Tensor:
    """``(1/L) Σ_l (z̄_l − t)²`` for gates (B, L): z̄_l the batch mean of gate l."""
    return ((gates.mean(0) - target) ** 2).mean()


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    """The gate's softmax keep-probability (B,) from its (B, 2) logits."""
    return F.softmax(logits.float(), dim=1)[:, 1]


def greedy_keep(logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Test-time decision (B,) float 0/1: ``logit_keep > logit_drop`` (the argmax), or
    ``softmax keep-probability >= threshold`` when a threshold is given."""
    if threshold is None:
        return (logits[:, 1] > logits[:, 0]).float()
    return (keep_probability(logits) >= threshold).float()


# -- networks -----------------------------------------------------------------------
class AIGGate(nn.Module):
    """One gate: pool, Linear(C_in, 16), BatchNorm1d, ReLU, Linear(16, 2)."""

    def __init__(self, in_channels: int, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc1bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.fc2.weight.normal_(0.0, INIT_STD)
            self.fc2.bias.copy_(torch.tensor(INIT_BIAS))

    @property
    def flops(self) -> int:
        """Per image: the two linear layers (2 FLOPs per multiply-accumulate)."""
        return 2 * (self.fc1.in_features * self.fc1.out_features
                    + self.fc2.in_features * self.fc2.out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits over {drop, keep} from the block input ``h`` (B, C, H, W). A
        training batch of one image (the last of an epoch) normalises with the running
        statistics, which batch statistics of one value cannot replace."""
        a = self.fc1(h.mean((2, 3)))
        bn = self.fc1bn
        if self.training and a.shape[0] == 1:
            a = F.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                             0.0, bn.eps)
        else:
            a = bn(a)
        return self.fc2(F.relu(a))


class AIGAgent(nn.Module):
    """The gates of ConvNet-AIG, one per residual block (``C_in``: its input channels).

    The buffer ``fixed_first`` (saved with the gates) holds F: blocks 0..F-1 always run,
    their gates are neither run nor counted (the README's ResNet-101 schedule, F = 8)."""

    def __init__(self, in_channels: Sequence[int], hidden: int = HIDDEN):
        super().__init__()
        self.in_channels: tuple[int, ...] = tuple(in_channels)
        self.gates = nn.ModuleList(AIGGate(c, hidden) for c in self.in_channels)
        self.register_buffer("fixed_first", torch.zeros((), dtype=torch.long))

    @property
    def num_blocks(self) -> int:
        return len(self.gates)

    @property
    def fixed(self) -> int:
        """F: the leading blocks that always run, without a gate."""
        return int(self.fixed_first)

    @property
    def flops(self) -> int:
        """FLOPs of the gates that run, per image (Linear layers only; pooling and BN are
        free)."""
        return sum(g.flops for g in self.gates[self.fixed:])


def build_aig_agent(spec: ModelSpec) -> AIGAgent:
    """ConvNet-AIG gates for the base ResNet of ``spec`` (randomly initialised)."""
    with torch.device("meta"):  # only the layout is read
        rnet = build_resnet(spec)
    return AIGAgent([rnet.block(t).conv1.in_channels for t in range(rnet.num_blocks)])


@dataclass
class AIGOutput:
    logits: torch.Tensor  # (B, classes)
    gates: torch.Tensor  # (B, K) 0/1 decisions; in training with the straight-through gradient
    soft: torch.Tensor  # (B, K) keep probabilities (soft Gumbel samples in training)


def aig_pass(rnet: FlatResNet, agent: AIGAgent, x: torch.Tensor,
             noise: torch.Tensor | None = None, temperature: float = DEFAULT_TEMPERATURE,
             mode: str = "masked", threshold: float | None = None,
             keep_first: int = 0) -> AIGOutput:
    """Gate, then block or skip, block after block (the agent's first ``fixed`` blocks
    run without a gate: decision 1, soft value 1).

    ``noise`` (B, K) uniform: straight-through Gumbel samples (training); None: the
    deterministic test rule (:func:`greedy_keep`). ``mode`` "masked" computes every block
    for every row and selects (with gradient); "grouped" runs a block only on the rows
    that keep it (batch 1: a dropped block is not computed). The first ``keep_first``
    blocks are kept whatever their gates say (their gates still run)."""
    check_pass(mode, MODES, agent.num_blocks, rnet)
    h = rnet.stem(x)
    gates, softs = [], []
    fixed = agent.fixed
    for t in range(rnet.num_blocks):
        if t < fixed:
            z = soft = h.new_ones(h.shape[0], dtype=torch.float32)
            h = rnet.run_block(t, h, rnet.residual(t, h))
            gates.append(z)
            softs.append(soft)
            continue
        logits = agent.gates[t](h).float()
        if noise is None:
            z, soft = greedy_keep(logits, threshold), keep_probability(logits)
        else:
            z, soft = gumbel_gate(logits, noise[:, t], temperature)
        if t < keep_first:
            z = torch.ones_like(z)
        residual = rnet.residual(t, h)
        if mode == "grouped":
            h = run_on_rows(rnet, t, h, residual, z)
        else:
            m = z.to(h.dtype).view(-1, 1, 1, 1)  # exact selection for 0/1 values
            h = rnet.run_block(t, h, residual) * m + residual * (1 - m)
        gates.append(z)
        softs.append(soft)
    return AIGOutput(rnet.head(h), torch.stack(gates, 1), torch.stack(softs, 1))



class AIGNet(JointNet):
    """A ResNet and its ConvNet-AIG gates: ``forward(x, noise, temperature)`` is
    :func:`aig_pass`."""

    run = staticmethod(aig_pass)


# -- test-time source -----------------------------------------------------------------
class AIGSource(PolicySource):
    """ConvNet-AIG's deterministic gates interleaved with the blocks. ``threshold`` T:
    block l is kept iff its gate's softmax keep-probability >= T (None: the argmax,
    keep iff logit_keep > logit_drop)."""

    name = "convnet_aig"
    one_shot = False

    def __init__(self, agent: AIGAgent, threshold: float | None = None):
        self.agent = agent
        self.policy_flops = agent.flops
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("ConvNet-AIG decides while the ResNet runs; use run(rnet, x)")

    def run(self, rnet: FlatResNet, x: torch.Tensor, dynamic: bool = True,
            keep_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``dynamic``: each block only on the rows that keep it; ``False``: masked."""
        mode = "grouped" if dynamic else "masked"

        def one_chunk(xs, _):
            out = aig_pass(rnet, self.agent, xs, mode=mode, threshold=self.threshold,
                           keep_first=keep_first)
            return out.logits, out.gates
        return in_chunks(rnet, one_chunk, x)


# -- training -----------------------------------------------------------------------
def aig_train_step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   noise: torch.Tensor, *, target: float, loss_weight: float,
                   temperature: float = DEFAULT_TEMPERATURE, amp: str = "none") -> StepOutput:
    """One joint step: straight-through Gumbel gates, masked blocks, cross-entropy plus
    ``loss_weight · target_rate_loss``. ``net`` is an :class:`AIGNet` (maybe DDP-wrapped).
    Blocks without a gate (``fixed_first``) are left out of the target-rate loss. The
    log's reward is 0 (ConvNet-AIG has none)."""
    with autocast(amp, inputs.device):
        out = net(inputs, noise, temperature)
    logits = out.logits.float()
    fixed = unwrap(net).agent.fixed
    rate = target_rate_loss(out.gates[:, fixed:], target)
    loss = F.cross_entropy(logits, targets) + loss_weight * rate
    match = (logits.argmax(1) == targets).float()
    return StepOutput(loss, match, out.gates.detach(), torch.zeros(len(inputs)))


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class AIGDecision(Decision):
    """ConvNet-AIG in an exported graph: gate t reads block t's input (the first
    ``fixed`` blocks always run); keep iff ``logit_keep > logit_drop``, or the softmax
    keep-probability ``>= threshold``."""

    method = "convnet_aig"

    def __init__(self, agent: AIGAgent, threshold: float | None = None):
        super().__init__()
        self.agent = agent
        self.threshold = threshold
        self.ungated = agent.fixed  # a plain int in the graph (the buffer is read once)

    def keep(self, t: int, h: torch.Tensor, state) -> torch.Tensor:
        if t < self.ungated:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        return greedy_keep(self.agent.gates[t](h), self.threshold) > 0.5


class ConvNetAIG(Method):
    """ConvNet-AIG (Veit & Belongie, ECCV 2018): per-block gates on the block's input,
    trained with the straight-through Gumbel-softmax and a target-rate loss. A moved
    threshold T keeps block l iff its gate's softmax keep-probability is >= T."""

    name = "convnet_aig"
    agent_class = AIGAgent
    agent_words = "ConvNet-AIG gates"
    summary = "ConvNet-AIG: per-block Gumbel gates on the block input, target-rate loss"
    stages = (FINETUNE,)
    threshold_help = ("block l is kept iff its gate's softmax keep-probability >= T, T in "
                      "[0, 1] (default: the argmax, logit_keep > logit_drop)")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("convnet_aig (--agent convnet_aig)")
        self.option(group, "--aig_target", type=float, default=DEFAULT_TARGET,
                    help="target rate t: the fraction of images each gate should keep its "
                         "block for, in (0, 1] (default 0.6, the authors' CIFAR setting)")
        self.option(group, "--aig_loss_weight", type=float, default=DEFAULT_LOSS_WEIGHT,
                    help="weight of the target-rate loss (1/L) sum_l (mean z_l - t)^2, >= 0 "
                         "(default 2, the authors' CIFAR setting; 1 on ImageNet)")
        self.option(group, "--aig_temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help="Gumbel-softmax temperature of the backward pass, > 0 (default 1)")
        self.option(group, "--aig_fixed_first", type=int, default=0,
                    help="the first F blocks always run, without a gate, and are left out of "
                         "the target-rate loss, 0 <= F < K (default 0; the README's ResNet-101 "
                         "schedule: 8)")

    def check_options(self, args: argparse.Namespace) -> list[str]:
        problems = []
        t = args.aig_target
        if not (_finite(t) and 0.0 < t <= 1.0):
            problems.append(f"--aig_target must lie in (0, 1], got {t}")
        w = args.aig_loss_weight
        if not (_finite(w) and w >= 0.0):
            problems.append(f"--aig_loss_weight must be a finite number >= 0, got {w}")
        tau = args.aig_temperature
        if not (_finite(tau) and tau > 0.0):
            problems.append(f"--aig_temperature must be a finite number > 0, got {tau}")
        try:
            num_blocks = get_spec(args.model).num_blocks
        except ValueError:  # an unknown --model is reported by the common checks
            return problems
        fixed = args.aig_fixed_first
        if not 0 <= fixed < num_blocks:
            problems.append(f"--aig_fixed_first must lie in 0..{num_blocks - 1} for "
                            f"{args.model}, got {fixed}")
        return problems

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_aig_agent(spec)

    def prepare(self, stage: str, rnet: FlatResNet, agent: nn.Module | None,
                args: argparse.Namespace, spec: ModelSpec) -> None:
        """``--aig_fixed_first`` F into the agent (saved with it); the F unused gates are
        frozen, so that neither Adam nor DDP waits for their gradients."""
        agent.fixed_first.fill_(args.aig_fixed_first)
        for t, gate in enumerate(agent.gates):
            gate.requires_grad_(t >= agent.fixed)

    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        if stage != FINETUNE:
            return super().train_step(stage, args, rnet, agent, where)
        net = wrap(AIGNet(rnet, agent), where.device, where.info)

        def step(inputs, targets, noise, cl_step):
            return aig_train_step(net, inputs, targets, noise, target=args.aig_target,
                                  loss_weight=args.aig_loss_weight,
                                  temperature=args.aig_temperature, amp=args.amp)
        return net, step

    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        """Each gate becomes a random projection of its standardised hidden units: fc1
        random, its BatchNorm's running statistics those of ``images``, fc2 random with
        the drop bias set so that the gate keeps its block for about ``keep_fraction``
        of ``images``."""
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
        was_training = agent.training
        agent.eval()
        with torch.no_grad():
            h = rnet.stem(images)
            for t, gate in enumerate(agent.gates):
                if t < agent.fixed:  # always runs, no gate
                    h = rnet.run_block(t, h, rnet.residual(t, h))
                    continue
                pooled = h.mean((2, 3))
                w1 = torch.randn(gate.fc1.weight.shape, generator=generator).to(pooled)
                gate.fc1.weight.copy_(w1 / pooled.shape[1] ** 0.5)
                gate.fc1.bias.zero_()
                a = gate.fc1(pooled)
                gate.fc1bn.running_mean.copy_(a.mean(0))
                gate.fc1bn.running_var.copy_(a.var(0, unbiased=False) + 1e-3)
                gate.fc1bn.weight.fill_(1.0)
                gate.fc1bn.bias.zero_()
                hidden = F.relu(gate.fc1bn(a))
                w2 = torch.randn(gate.fc2.weight.shape, generator=generator).to(pooled)
                margin = hidden @ (w2[1] - w2[0])
                cut = torch.quantile(margin.double(), 1.0 - keep_fraction).to(margin)
                gate.fc2.weight.copy_(w2)
                gate.fc2.bias.copy_(torch.stack([cut, torch.zeros_like(cut)]))
                keep = greedy_keep(gate(h)).to(h.dtype).view(-1, 1, 1, 1)
                residual = rnet.residual(t, h)
                h = rnet.run_block(t, h, residual) * keep + residual * (1 - keep)
        agent.train(was_training)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        return AIGDecision(agent, source.threshold)

    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        return AIGSource(self.checked_agent(spec, agent), self.checked_threshold(threshold))


register(ConvNetAIG())
