"""What a way of choosing blocks provides: the :class:`Method` hooks and ``register``.

A *method* is one module of this package (BlockDrop, BlockDrop-seq, the fixed
heuristics of Table 1, ...). It subclasses :class:`Method`, fills in the hooks it
needs and registers an instance with :func:`register`; :mod:`policies.registry`
finds every module of the package and answers the engine, the scripts and the
checkpoints by name. ``docs/adding-a-method.md`` walks through a complete example.

The hooks, in the order a training stage calls them:

* ``add_options``/``check_options``: the method's own command-line flags;
* ``build``: its deciding network, randomly initialised (None for a fixed rule);
* ``initialise``: how a fresh run starts that network (no checkpoint given);
* ``trained_modules``/``prepare``: what a training stage optimises and saves;
* ``train_step``: the step of a training stage (``"cl"`` curriculum learning,
  ``"finetune"`` joint finetuning), returning a :class:`StepOutput`;
* ``source``: the test-time decisions as a :class:`policies.source.PolicySource`,
  which also knows the FLOPs of deciding per image;
* ``record``: what a stage checkpoint stores besides the networks.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from models import FlatResNet, ModelSpec
from utils.dist import DistInfo

from .source import PolicySource, PolicySourceError

CURRICULUM = "cl"  # training stage: the policy alone, one more block per epoch (Alg. 1)
FINETUNE = "finetune"  # training stage: the policy and the ResNet together


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimise and what the log counts."""

    loss: torch.Tensor
    match: torch.Tensor  # (B,) 1 where the prediction (under the sampled policy) is right
    policy: torch.Tensor | None = None  # (B, K) the sampled policy
    reward: torch.Tensor | None = None  # (B,) its reward


class Where(Protocol):
    """Where a training process runs (the launcher's context)."""

    info: DistInfo
    device: torch.device


# step(inputs, targets, noise, cl_step) -> StepOutput; noise is (B, K) uniform keyed per image
TrainStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], StepOutput]


class Method:
    """A way of choosing which blocks run. Subclasses set ``name`` and override hooks."""

    name: str = ""
    summary: str = ""
    learned: bool = True  # decides with a network, saved as a checkpoint's 'agent'
    stages: tuple[str, ...] = (CURRICULUM, FINETUNE)  # the training stages that train it
    threshold_help: str = ""  # what test.py --threshold means for it ("" : not supported)
    threshold_range: tuple[float, float] = (0.0, 1.0)  # the thresholds it accepts
    threshold_low_open: bool = False  # the range excludes its low end (ACT: (0, 1])
    # a learned method: the class of network its source reads, and its name in errors
    agent_class: type | None = None
    agent_words: str = ""
    seeded: bool = False  # its decisions depend on --seed (a random draw)
    # a training regime chosen by its own flag (e.g. --stochastic_depth P) rather than by
    # --agent/--policy: the dest of that flag; the method is chosen when it is set
    selected_by: str | None = None
    # a variant that takes another method's flags (added once, by that method): its name
    options_of: str | None = None

    def __init__(self) -> None:
        self.option_defaults: dict[str, Any] = {}

    # -- command line -----------------------------------------------------------
    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Add the method's own flags (register them with :meth:`option`)."""

    def option(self, group, flag: str, **kwargs: Any) -> None:
        """Add ``flag`` to ``group`` and remember its default (so that giving it to another
        method is caught)."""
        action = group.add_argument(flag, **kwargs)
        self.option_defaults[action.dest] = action.default

    def check_options(self, args: argparse.Namespace) -> list[str]:
        """Problems with the method's flag values (empty if none)."""
        return []

    # -- networks ---------------------------------------------------------------
    def build(self, spec: ModelSpec) -> nn.Module | None:
        """The deciding network for ``spec``, randomly initialised; None for a fixed rule."""
        return None

    def initialise(self, agent: nn.Module, spec: ModelSpec, args: argparse.Namespace,
                   stage: str) -> None:
        """Start ``agent`` for a fresh run of ``stage`` (no checkpoint gave it weights)."""

    def trained_modules(self, stage: str, rnet: FlatResNet,
                        agent: nn.Module | None) -> dict[str, nn.Module]:
        """The networks ``stage`` optimises and saves, keyed as in the checkpoints."""
        if stage == CURRICULUM:
            return {"agent": agent}
        return {"agent": agent, "resnet": rnet}

    def prepare(self, stage: str, rnet: FlatResNet, agent: nn.Module | None,
                args: argparse.Namespace, spec: ModelSpec) -> None:
        """Anything to set before the optimizer is built (e.g. frozen parameters)."""

    # -- training ---------------------------------------------------------------
    def train_step(self, stage: str, args: argparse.Namespace, rnet: FlatResNet,
                   agent: nn.Module | None, where: Where) -> tuple[nn.Module, TrainStep]:
        """``(trained, step)``: the module(s) whose ``train()`` sets the training modes
        (wrapped for DDP where needed) and the step function of ``stage``."""
        raise PolicySourceError(f"{self.name} is not trained by the {stage!r} stage "
                                f"(it is trained by: {', '.join(self.stages) or 'none'})")

    def calibrate(self, agent: nn.Module, rnet: FlatResNet, images: torch.Tensor,
                  keep_fraction: float, generator: torch.Generator) -> None:
        """Make an untrained ``agent`` keep about ``keep_fraction`` of the blocks on
        ``images``, with decisions that differ between images (the benchmark times
        methods on random weights)."""
        raise NotImplementedError(f"{self.name} cannot be calibrated for timing")

    # -- evaluation -------------------------------------------------------------
    def source(self, spec: ModelSpec, agent: nn.Module | None = None, *, k: int | None = None,
               seed: int = 0, threshold: float | None = None) -> PolicySource:
        """The test-time decisions of ``agent`` (or of the rule with ``k``/``seed``)."""
        raise NotImplementedError

    def checked_agent(self, spec: ModelSpec, agent: nn.Module | None) -> nn.Module:
        """``agent`` if it is this method's network (``agent_class``) for ``spec``'s
        blocks, else one line naming what was expected."""
        if self.agent_class is None or not isinstance(agent, self.agent_class):
            raise PolicySourceError(f"the {self.name} source needs {self.agent_words} (a "
                                    f"checkpoint written with --agent {self.name})")
        blocks = getattr(agent, "num_blocks", None)
        if blocks is not None and blocks != spec.num_blocks:
            raise PolicySourceError(f"the {self.agent_words} decide {blocks} blocks, "
                                    f"{spec.name} has {spec.num_blocks}")
        return agent

    def checked_threshold(self, threshold: float | None) -> float | None:
        """None, or ``threshold`` if it is a finite number in ``threshold_range``."""
        if threshold is None:
            return None
        low, high = self.threshold_range
        above = low < threshold if self.threshold_low_open else low <= threshold
        if not (math.isfinite(threshold) and above and threshold <= high):
            bracket = "(" if self.threshold_low_open else "["
            raise PolicySourceError(f"--threshold for {self.name} must lie in "
                                    f"{bracket}{low:g}, {high:g}], got {threshold}")
        return float(threshold)

    def export_decision(self, spec: ModelSpec, agent: nn.Module | None,
                        source: PolicySource) -> nn.Module:
        """The decisions of ``source`` as a :class:`models.export.Decision` for an ONNX
        graph (``python -m scripts.export``): one-shot (``begin``) or per block (``keep``)."""
        raise PolicySourceError(f"the {self.name} method does not export to ONNX")

    def record(self, source: PolicySource) -> dict[str, Any]:
        """Entries a stage checkpoint stores besides the networks."""
        return {"agent_type": self.name}

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class JointNet(nn.Module):
    """A ResNet and its deciding network as one module, so that a training step is one
    ``forward`` (which DistributedDataParallel needs to synchronise both). A subclass sets
    ``run(rnet, agent, x, ...)``, the method's pass; ``forward(x, ...)`` calls it."""

    run: Callable[..., Any]

    def __init__(self, rnet: FlatResNet, agent: nn.Module):
        super().__init__()
        self.rnet = rnet
        self.agent = agent

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return type(self).run(self.rnet, self.agent, x, *args, **kwargs)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name; a second method of the same name is refused."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    if method.name in METHODS and type(METHODS[method.name]) is not type(method):
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method
