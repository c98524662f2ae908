"""From-scratch reproduction: the training steps of paper Sec. 3.3-4 from ``configs/``.

pretraining of the base ResNet (only when no base network is given or found), curriculum
learning of the policy, joint finetuning per γ, and finetuning under fixed policies for
Table 1. Runs go into ``<cv_root>`` in the authors' layout (``pretrained/<model>/``,
``cl_training/<model>/``, ``finetuned/<model>_gamma_<γ>/``), so the tables read trained
and released checkpoints the same way. ``smoke`` swaps the configs' schedules for tiny
ones (one epoch, small batches) to run everything end to end on generated data.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable

from models import get_spec
from scripts.repro.released import gamma_text
from scripts.repro.steps import StepError, Step, make_step, run_step

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
SMOKE_SCHEDULES: dict[str, dict[str, Any]] = {  # script -> tiny schedule
    "pretrain_resnet.py": {"epochs": 1, "batch_size": 16, "milestones": [1], "lr": 0.02,
                           "test_every": 1},
    "cl_training.py": {"max_epochs": 1, "batch_size": 16},
    "finetune.py": {"max_epochs": 1, "batch_size": 16},
}


@dataclass
class Plan:
    """Where and how the training steps run."""

    cv_root: str
    data_dir: str
    device: str
    workers: int
    logs: str  # folder of the step logs
    smoke: bool = False
    resume: bool = False
    force: bool = False
    base_ckpt: str | None = None  # a base ResNet to use instead of pretraining one
    policy_init: str | None = None  # cl_training.py --policy_init (ImageNet)
    say: Any = print


def config_path(kind: str, name: str) -> str:
    path = os.path.join(CONFIGS, kind, f"{name}.yaml")
    if not os.path.isfile(path):
        raise StepError(f"no {kind} config for {name}: expected {path}")
    return path


def finetune_config(model: str, gamma: float) -> str:
    """``configs/finetune/<model>_gamma<γ>.yaml``, else another γ's file of the model (its
    schedule; the penalty is set to −γ)."""
    exact = os.path.join(CONFIGS, "finetune", f"{model}_gamma{gamma_text(gamma)}.yaml")
    if os.path.isfile(exact):
        return exact
    others = sorted(glob.glob(os.path.join(CONFIGS, "finetune", f"{model}_gamma*.yaml")))
    if not others:
        raise StepError(f"no finetuning config for {model}: expected {exact}")
    return others[0]


def _common(plan: Plan, model: str, script: str, cv_dir: str) -> dict[str, Any]:
    opts = {"model": model, "data_dir": plan.data_dir, "cv_dir": cv_dir,
            "device": plan.device, "workers": plan.workers, "no_progress": True}
    if plan.smoke:
        opts.update(SMOKE_SCHEDULES[script])
    return opts


def _log(plan: Plan, name: str) -> str:
    return os.path.join(plan.logs, name.replace(" ", "_").replace("=", "") + ".log")


def _run(plan: Plan, step: Step) -> str:
    return run_step(step, resume=plan.resume, force=plan.force, say=plan.say)


def base_network(plan: Plan, model: str) -> str:
    """The base ResNet: ``plan.base_ckpt``, else the model's default file (not in smoke
    runs), else a pretraining step's checkpoint."""
    if plan.base_ckpt:
        if not os.path.isfile(plan.base_ckpt):
            raise StepError(f"--base_ckpt {plan.base_ckpt}: no such file")
        return plan.base_ckpt
    found = sorted(glob.glob(get_spec(model).base_checkpoint))  # the name may be a pattern
    if not plan.smoke and found:
        plan.say(f"[base] {model}: {found[-1]}")
        return found[-1]
    name = f"pretrain {model}"
    opts = _common(plan, model, "pretrain_resnet.py",
                   os.path.join(plan.cv_root, "pretrained", model))
    return _run(plan, make_step(name, "pretrain_resnet.py", config_path("pretrain", model),
                                opts, _log(plan, name)))


def curriculum(plan: Plan, model: str, base: str) -> str:
    """The curriculum-learning step's final checkpoint."""
    name = f"curriculum {model}"
    opts = _common(plan, model, "cl_training.py", os.path.join(plan.cv_root, "cl_training", model))
    opts.update(base_ckpt=base, policy_init=plan.policy_init)
    return _run(plan, make_step(name, "cl_training.py", config_path("cl", model), opts,
                                _log(plan, name)))


def finetune(plan: Plan, model: str, gamma: float, base: str, pretrained: str | None,
             fixed: dict[str, Any] | None = None) -> str:
    """Joint finetuning at γ from the curriculum policy, or (``fixed``: ``policy``, ``k``,
    ``seed``) finetuning of the ResNet under a fixed policy (Table 1's "ft" rows)."""
    if fixed:
        tag = f"{fixed['policy']}_k{fixed['k']}" + (
            f"_seed{fixed['seed']}" if fixed.get("seed") is not None else "")
        name, folder = f"finetune {model} {tag}", os.path.join(
            plan.cv_root, "finetuned_fixed", f"{model}_{tag}")
    else:
        name = f"finetune {model} gamma={gamma_text(gamma)}"
        folder = os.path.join(plan.cv_root, "finetuned", f"{model}_gamma_{gamma_text(gamma)}")
    opts = _common(plan, model, "finetune.py", folder)
    opts.update(base_ckpt=base, penalty=-float(gamma), pretrained=pretrained)
    if fixed:
        opts.update(pretrained="", **fixed)  # "" clears the config's curriculum checkpoint
    return _run(plan, make_step(name, "finetune.py", finetune_config(model, gamma), opts,
                                _log(plan, name)))


def blockdrop(plan: Plan, model: str, gammas: Iterable[float]) -> dict[str, Any]:
    """Every training step of BlockDrop for ``model``: base, curriculum, finetuning per γ.
    Returns ``{"base", "curriculum", "finetuned": {γ: checkpoint}}``."""
    base = base_network(plan, model)
    cl = curriculum(plan, model, base)
    tuned = {float(g): finetune(plan, model, g, base, cl) for g in gammas}
    return {"base": base, "curriculum": cl, "finetuned": tuned}


def default_gammas(model: str) -> list[float]:
    """The γ of the model's finetuning configs (``configs/finetune/<model>_gamma<γ>.yaml``)."""
    out = []
    for path in glob.glob(os.path.join(CONFIGS, "finetune", f"{model}_gamma*.yaml")):
        tail = os.path.basename(path)[len(model) + len("_gamma"):-len(".yaml")]
        try:
            out.append(float(tail))
        except ValueError:
            continue
    return sorted(out)


def method_configs(name: str, model: str) -> list[str]:
    """A registered method's training configs for ``model``: ``configs/<name>/<model>.yaml``,
    or its steps ``configs/<name>/<model>_<step>.yaml`` in name order."""
    single = os.path.join(CONFIGS, name, f"{model}.yaml")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(CONFIGS, name, f"{model}_*.yaml")))


def method_run(plan: Plan, model: str, name: str, base: str, curriculum_ckpt: str | None,
               gamma: float = 5.0) -> str:
    """One finetuning run of the registered method ``name`` from the base network, with
    its configs (each later step continuing from the previous step's checkpoint via
    ``--load``); without configs of its own, BlockDrop's finetuning schedule with
    ``--agent name``. Returns the last step's final checkpoint."""
    configs = method_configs(name, model)
    previous = None
    for i, config in enumerate(configs or [finetune_config(model, gamma)]):
        step_name = f"{name} {model}" + (f" step {i + 1}" if len(configs) > 1 else "")
        folder = os.path.join(plan.cv_root, "methods", f"{model}_{name}"
                              + (f"_{i + 1}" if len(configs) > 1 else ""))
        opts = _common(plan, model, "finetune.py", folder)
        opts.update(base_ckpt=base, pretrained="")
        if not configs:
            opts.update(agent=name, penalty=-float(gamma))
        if previous is not None:
            opts.update(load=previous)
        previous = _run(plan, make_step(step_name, "finetune.py", config, opts,
                                        _log(plan, step_name)))
    return previous
