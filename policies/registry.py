"""The registry of methods: every way of choosing blocks, by name.

Every module of this package that registers a :class:`policies.method.Method` is
found when the registry is imported, so a new method is one file here (plus its
test): ``docs/adding-a-method.md``. The engine, test.py, the training scripts,
checkpoints, the benchmark and the reproduction tools ask this module; nothing
outside it compares method names.

A stage checkpoint names its method: ``agent_type`` (a learned method's name;
files without one, the authors', hold BlockDrop's policy network) or
``fixed_policy: {name, k, seed}`` (a ResNet finetuned under a fixed rule).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

import policies
from models import ModelSpec

from .method import METHODS, Method
from .source import PolicySource, PolicySourceError

DEFAULT_METHOD = "blockdrop"  # what a checkpoint without an 'agent_type' record holds
_FRAME = {"method", "registry", "source", "rewards", "policy_init"}  # not methods


def _discover() -> None:
    """Import every method module of the package (each registers itself)."""
    for info in pkgutil.iter_modules(policies.__path__):
        if info.name not in _FRAME:
            importlib.import_module(f"policies.{info.name}")


_discover()


def method_names(learned: bool | None = None) -> tuple[str, ...]:
    """Registered names (only learned or only fixed ones when ``learned`` is given)."""
    return tuple(name for name, m in METHODS.items() if learned is None or m.learned == learned)


def get_method(name: str, what: str = "method") -> Method:
    """The method registered as ``name``; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise PolicySourceError(f"unknown {what} {name!r}; registered: "
                                f"{', '.join(method_names())}")
    return METHODS[name]


def build_agent(spec: ModelSpec, name: str = DEFAULT_METHOD) -> nn.Module:
    """A randomly initialised deciding network of the learned method ``name``."""
    method = get_method(name, "agent")
    if not method.learned:
        raise PolicySourceError(f"{name} is a fixed policy and has no network; learned "
                                f"methods: {', '.join(method_names(learned=True))}")
    return method.build(spec)


def build_source(name: str, spec: ModelSpec, *, agent: nn.Module | None = None,
                 k: int | None = None, seed: int = 0,
                 threshold: float | None = None) -> PolicySource:
    """The policy source of method ``name`` for ``spec``: from ``agent`` (a learned
    method), or from ``k`` and ``seed`` (a fixed rule); ``threshold`` moves a learned
    method's keep threshold from its default."""
    return get_method(name, "policy").source(spec, agent, k=k, seed=seed, threshold=threshold)


# -- checkpoints ---------------------------------------------------------------
def recorded_name(ckpt: Any) -> str | None:
    """The method name a checkpoint records: its ``fixed_policy`` rule, its ``agent_type``
    (``blockdrop`` for a file with an agent and no record), None for neither."""
    if not isinstance(ckpt, Mapping):
        return None
    fixed = ckpt.get("fixed_policy")
    if isinstance(fixed, Mapping) and "name" in fixed:
        return str(fixed["name"])
    if not any(k in ckpt for k in ("agent", "net")):
        return None
    return str(ckpt.get("agent_type", DEFAULT_METHOD))


def method_of(ckpt: Any, path: str = "the checkpoint") -> Method | None:
    """The registered method a checkpoint was written by, or None (a plain ResNet);
    one line naming the registered methods when its record names none of them."""
    name = recorded_name(ckpt)
    if name is None:
        return None
    if name not in METHODS:
        raise PolicySourceError(f"{path} was written by the method {name!r}, which is not "
                                f"registered (registered: {', '.join(method_names())})")
    return METHODS[name]


def check_method(ckpt: Any, path: str, expected: str, flag: str = "--agent") -> None:
    """Refuse, in one line naming both, a checkpoint of another method than ``expected``."""
    found = method_of(ckpt, path)
    if found is not None and found.learned and found.name != expected:
        raise PolicySourceError(f"{path} holds a {found.name!r} agent, not {expected!r} "
                                f"(pass {flag} {found.name}, or a checkpoint of a {expected} "
                                f"agent)")


# -- command line ------------------------------------------------------------------
def chosen_method(args: argparse.Namespace) -> Method:
    """The method a training run trains: a regime whose own flag is set (e.g.
    ``--stochastic_depth``), else the fixed ``--policy``, else ``--agent``."""
    for method in METHODS.values():
        flag = method.selected_by
        if flag is not None and getattr(args, flag, None) != method.option_defaults.get(flag):
            return method
    return get_method(getattr(args, "policy", None) or args.agent)



def add_method_options(parser: argparse.ArgumentParser) -> None:
    """Every registered method's own flags, one argument group each."""
    for method in METHODS.values():
        method.add_options(parser)


def option_problems(args: argparse.Namespace, chosen: str | None) -> list[str]:
    """The chosen method's checks, and flags of other methods that were set (a regime's
    selecting flag given with another method is left to the regime's own check)."""
    problems = [] if chosen is None else list(get_method(chosen).check_options(args))
    own = {chosen, None if chosen is None else get_method(chosen).options_of}
    for method in METHODS.values():
        if method.name in own:
            continue
        for dest, default in method.option_defaults.items():
            if dest != method.selected_by and getattr(args, dest, default) != default:
                problems.append(f"--{dest} belongs to the {method.name} method, not "
                                f"{chosen or 'this run'}; leave it out")
    return problems
