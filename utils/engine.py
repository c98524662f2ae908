"""The loops shared by every entry point: one engine.

``evaluate`` runs a policy source over a test set (test.py and the training
scripts' periodic test; paper Sec. 4, docs/evaluation.md). The epoch loop
:func:`fit` trains any stage; a stage's step comes from its method
(:mod:`policies`), or is the plain classifier step of base-network pretraining.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models import FlatResNet
from models.fast import DEFAULT as DEFAULT_FAST
from models.fast import FastOptions, inference_copy
from models.flops import FlopTable
from policies.method import StepOutput
from policies.rewards import reward
from policies.source import PolicySource
from utils.amp import autocast
from utils.checkpoint import (CheckpointError, NonFiniteError, first_non_finite, load_state_strict,
                              save_checkpoint)
from utils.dist import DistInfo, all_true, gather_cat, gather_objects, unwrap
from utils.run_folder import LAST, RunLog
from utils.seeding import rng_state, set_rng_state
from utils.stats import PolicyStats, mean32, policy_stats


@dataclass
class EvalResult:
    policies: torch.Tensor  # (N, K) uint8, the greedy policy of every image
    matches: torch.Tensor  # (N,) float, 1 where the prediction is right
    rewards: torch.Tensor | None  # (N,) Eq. 3 rewards, when a penalty was given
    flops: np.ndarray | None  # (N,) int64 FLOPs per image, policy network included
    stats: PolicyStats


@torch.no_grad()
def evaluate(rnet: FlatResNet, source: PolicySource, loader: Iterable,
             device: torch.device, flops: FlopTable | None = None,
             penalty: float | None = None, cl_step: int | None = None,
             dynamic: bool = True, progress: bool = True, desc: str = "test",
             fast: FastOptions = DEFAULT_FAST) -> EvalResult:
    """Run ``source``'s decisions over ``loader`` and collect the paper's statistics.

    ``source``: a policy source (:mod:`policies.source`, built through
    :func:`policies.registry.build_source`). Per-image FLOPs are the ResNet's under
    the policy plus ``source.policy_flops`` (0 for a fixed policy).
    ``cl_step``: during curriculum learning only the last ``cl_step`` blocks are
    decided, the others kept. ``dynamic`` runs each block only on the images that
    keep it; ``False`` uses the masked ``forward``. ``fast``: the inference
    optimisations applied to copies of the ResNet and the deciding network (models.fast).
    """
    rnet.eval()
    source.eval()
    rnet, source = inference_copy(rnet, fast, device), source.for_inference(fast, device)
    policies, matches, rewards = [], [], []
    for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        keep_first = 0 if cl_step is None else max(0, rnet.num_blocks - cl_step)
        preds, policy = source.run(rnet, inputs, dynamic=dynamic, keep_first=keep_first)
        match = (preds.argmax(1) == targets).float()
        if penalty is not None:
            rewards.append(reward(preds, targets, policy, penalty)[0].cpu())
        policies.append(policy.to(torch.uint8).cpu())
        matches.append(match.cpu())
    pol = torch.cat(policies)
    mat = torch.cat(matches)
    rew = torch.cat(rewards) if rewards else None
    per_image = None
    if flops is not None:
        per_image = (flops.per_image(pol, include_policy=False)
                     + source.decision_flops(pol)).numpy()
    return EvalResult(pol, mat, rew, per_image, policy_stats(pol, mat, rew))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite; training stops before the bad update."""


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], StepOutput]


def lr_at(epoch: int, lr0: float, decay: float, epoch_step: int) -> float:
    """The authors' LrScheduler: ``lr0 · decay^(epoch // epoch_step)``."""
    return lr0 * decay ** (epoch // epoch_step)


def authors_lr_schedule(lr0: float, decay: float, epoch_step: int,
                        say: Callable[[str], None] | None) -> Callable[[int], float]:
    """``epoch -> lr`` of :func:`lr_at`; ``say`` (the main process) gets the authors' line
    ``# setting learning_rate to %.2E`` at every epoch that is a multiple of ``epoch_step``,
    where their LrScheduler printed it."""
    def lr_for(epoch: int) -> float:
        lr = lr_at(epoch, lr0, decay, epoch_step)
        if say is not None and epoch % epoch_step == 0:
            say("# setting learning_rate to %.2E" % lr)
        return lr
    return lr_for


def multistep_lr(epoch: int, lr0: float, decay: float, milestones: Sequence[int]) -> float:
    """``lr0 · decay^(number of milestones <= epoch)`` (base-network pretraining)."""
    return lr0 * decay ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` for every parameter group, times the group's ``lr_scale`` where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def classifier_train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          amp: str = "none") -> StepOutput:
    """Plain cross-entropy training of a base ResNet (every block kept)."""
    with autocast(amp, inputs.device):
        preds = model(inputs)
    loss = F.cross_entropy(preds.float(), targets)
    return StepOutput(loss, (preds.argmax(1) == targets).float())


def _summary(matches: list[torch.Tensor], losses: list[float], policies: list[torch.Tensor],
             rewards: list[torch.Tensor]) -> dict[str, float]:
    """Epoch statistics over all processes: the authors' policy statistics, or accuracy."""
    match = gather_cat(torch.cat(matches))
    loss = gather_cat(torch.tensor(losses, dtype=torch.float64))
    if not policies:
        return {"accuracy": mean32(match.numpy()), "loss": float(loss.mean())}
    reward = gather_cat(torch.cat(rewards)) if rewards else None
    stats = policy_stats(gather_cat(torch.cat(policies)), match, reward)
    return {**asdict(stats), "loss": float(loss.mean())}


def train_epoch(step: StepFn, loader: Iterable, optimizer: torch.optim.Optimizer,
                device: torch.device, desc: str = "train",
                progress: bool = True) -> dict[str, float]:
    """One pass over ``loader`` (batches of ``(inputs, targets, indices)``).

    Raises NonFiniteLossError, before the update, when a loss is NaN or infinite
    on any process. Returns the epoch's statistics gathered over all processes.
    """
    matches, losses, policies, rewards = [], [], [], []
    for batch, (inputs, targets, indices) in enumerate(
            tqdm(loader, desc=desc, disable=not progress, leave=False)):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        out = step(inputs, targets, indices)
        value = out.loss.detach().item()
        if not all_true(math.isfinite(value)):
            raise NonFiniteLossError(f"non-finite loss ({value}) at batch {batch} of {desc}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(value)
        matches.append(out.match.detach().float().cpu())
        if out.policy is not None:
            policies.append(out.policy.detach().to(torch.uint8).cpu())
        if out.reward is not None:
            rewards.append(out.reward.detach().float().cpu())
    return _summary(matches, losses, policies, rewards)


def evaluate_policy(rnet: FlatResNet, source: PolicySource, loader: Iterable,
                    device: torch.device, penalty: float, cl_step: int | None = None,
                    dynamic: bool = True, progress: bool = True,
                    fast: FastOptions = DEFAULT_FAST) -> dict[str, float]:
    """Test statistics of ``source``, gathered over processes that each hold a shard."""
    result = evaluate(unwrap(rnet), source, loader, device, penalty=penalty,
                      cl_step=cl_step, dynamic=dynamic, progress=progress, fast=fast)
    stats = policy_stats(gather_cat(result.policies), gather_cat(result.matches),
                         gather_cat(result.rewards))
    return asdict(stats)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, device: torch.device,
                        progress: bool = True) -> dict[str, float]:
    """Test accuracy and mean cross-entropy of a plain classifier, over all shards."""
    model = unwrap(model)
    model.eval()
    matches, losses = [], []
    for inputs, targets in tqdm(loader, desc="test", disable=not progress, leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        preds = model(inputs)
        losses.append(F.cross_entropy(preds, targets, reduction="none").cpu())
        matches.append((preds.argmax(1) == targets).float().cpu())
    match, loss = gather_cat(torch.cat(matches)), gather_cat(torch.cat(losses))
    return {"accuracy": mean32(match.numpy()), "loss": float(loss.double().mean())}


# ---------------------------------------------------------------------------
# The epoch loop shared by every training script
# ---------------------------------------------------------------------------


@dataclass
class Stage:
    """What a script trains; :func:`fit` runs it. ``modules`` are the unwrapped
    networks, keyed as in the checkpoints (``agent``, ``resnet``)."""

    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    train_modes: Callable[[], None]  # put the networks in their training modes
    step_for: Callable[[int], StepFn]  # the training step of an epoch
    test: Callable[[int], dict[str, float]]  # test statistics at an epoch
    lr_for: Callable[[int], float]
    named_checkpoint: Callable[[int, dict[str, float]], tuple[str, dict[str, Any]]]
    extra_for: Callable[[int], dict[str, Any]] = lambda epoch: {}


@dataclass
class Loop:
    """Where a run goes: its epochs, when it tests, and where it writes."""

    epochs: range
    first_epoch: int  # the first epoch of the run (kept across resumes)
    test_due: Callable[[int], bool]
    cv_dir: str
    model: str
    config: dict[str, Any]
    progress: bool = True


def restore(stage: Stage, state: dict[str, Any], origin: str) -> int:
    """Load a ``last.t7`` (read from ``origin``) into the stage's networks and optimizer;
    returns its epoch.

    A state recovered from a stage checkpoint (``recovered_from``) has no
    optimizer state: the optimizer starts fresh.
    """
    if state.get("stage") != stage.name and "recovered_from" not in state:
        raise CheckpointError(f"{origin} was written by the {state.get('stage')!r} stage, "
                              f"not {stage.name!r}")
    for key, module in stage.modules.items():
        if key not in state:
            raise CheckpointError(f"{origin} has no '{key}' entry")
        load_state_strict(module, state[key], origin, key)
    if state.get("optimizer") is not None:
        stage.optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def save_last(stage: Stage, loop: Loop, epoch: int, info: DistInfo) -> None:
    """Write ``last.t7`` (main process), with the random states of every process."""
    states = gather_objects(rng_state())
    if not info.is_main:
        return
    payload: dict[str, Any] = {k: m.state_dict() for k, m in stage.modules.items()}
    payload.update(optimizer=stage.optimizer.state_dict(), epoch=epoch,
                   first_epoch=loop.first_epoch, rng=states, config=loop.config,
                   model=loop.model, stage=stage.name)
    save_checkpoint(payload, os.path.join(loop.cv_dir, LAST))


def check_finite(stage: Stage, epoch: int) -> None:
    """Stop before anything of ``epoch`` is tested or saved when a network's parameters or
    buffers hold NaN or inf (e.g. BatchNorm variances overflowing at a huge lr while the
    loss stays finite). Every process takes part, so all of them stop together."""
    bad = first_non_finite({key: m.state_dict() for key, m in stage.modules.items()})
    if not all_true(bad is None):
        raise NonFiniteError(f"non-finite model after epoch {epoch}: "
                             f"{bad or 'a network of another process'} is not finite")


def fit(stage: Stage, loop: Loop, loader: Iterable, sampler, device: torch.device,
        info: DistInfo, log: RunLog, rng_states: list[dict[str, Any]] | None = None) -> None:
    """Train ``stage`` over ``loop.epochs``: set the lr, train, test when due, save.

    ``sampler.set_epoch`` makes the data order a function of (seed, epoch);
    ``rng_states`` (from ``last.t7``) restores the global random states first.
    """
    if rng_states:
        set_rng_state(rng_states[min(info.rank, len(rng_states) - 1)])
    for epoch in loop.epochs:
        lr = stage.lr_for(epoch)
        set_lr(stage.optimizer, lr)
        sampler.set_epoch(epoch)
        stage.train_modes()
        train = train_epoch(stage.step_for(epoch), loader, stage.optimizer, device,
                            desc=f"epoch {epoch}", progress=loop.progress and info.is_main)
        check_finite(stage, epoch)
        test = stage.test(epoch) if loop.test_due(epoch) else None
        if test is not None and info.is_main:
            name, payload = stage.named_checkpoint(epoch, test)
            save_checkpoint(payload, os.path.join(loop.cv_dir, name))
        log.epoch(epoch, lr, train, test, **stage.extra_for(epoch))
        save_last(stage, loop, epoch, info)
