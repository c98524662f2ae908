"""Run configuration of the training scripts (STYLE convention 2, SPEC section 7).

Values are resolved in this order, later layers winning:

    argparse defaults  ->  saved run config (``--resume``)  ->  YAML (``--config``)
    ->  command-line flags that were given explicitly

Every YAML key must be the name of a flag (``batch_size``, ``lr``, ...). The
resolved configuration is written as ``config.yaml`` into the run folder
before the first training step.
"""
from __future__ import annotations

from utils.errors import UserError

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

# keys that steer this invocation or describe this machine: never taken from a saved config
RUN_CONTROL_KEYS = ("config", "resume", "device", "workers", "no_progress")


class ConfigError(UserError, ValueError):
    """A configuration file is unreadable or names unknown settings."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _convert(action: argparse.Action, value: Any) -> Any:
    if action.type is None or value is None:
        return value
    if isinstance(value, str) or action.type is float and isinstance(value, int):
        return action.type(value)
    if action.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("expected an integer")
    return value


def _coerce(action: argparse.Action, value: Any, source: str) -> Any:
    """Convert a YAML value with the flag's own type (YAML reads ``1e-3`` as a string)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{action.dest}' must be true or false, got {value!r}")
        return value
    try:
        if action.nargs in ("+", "*") and value is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_convert(action, v) for v in items]
        return _convert(action, value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: bad value for '{action.dest}': {value!r} ({err})") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of flag names to values."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data


def checked_layer(parser: argparse.ArgumentParser, values: Mapping[str, Any],
                  source: str) -> dict[str, Any]:
    """``values`` with every key checked against the parser's flags and converted."""
    actions = _actions(parser)
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(actions))}")
    return {k: _coerce(actions[k], v, source) for k, v in values.items()}


def resolve(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
            saved: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults, then ``saved``, then ``--config`` YAML, then flags.

    The parser must define ``--config``. Raises ConfigError for bad files.
    """
    first, _ = parser.parse_known_args(argv)
    layers: dict[str, Any] = {}
    if saved:
        kept = {k: v for k, v in saved.items()
                if k not in RUN_CONTROL_KEYS and k in _actions(parser)}
        layers.update(checked_layer(parser, kept, "saved run config"))
    if first.config:
        layers.update(checked_layer(parser, load_yaml(first.config), first.config))
    parser.set_defaults(**layers)
    return parser.parse_args(argv)


def to_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration as plain YAML/pickle-safe types."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_config(args: argparse.Namespace, folder: str) -> str:
    """Write the resolved configuration to ``<folder>/config.yaml``; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(to_plain(args), f, sort_keys=True)
    return path


def check_common(args: argparse.Namespace) -> list[str]:
    """Problems with the values shared by the training scripts (empty if none)."""
    problems = []
    positive = ("lr", "batch_size", "epoch_step", "test_every", "lr_decay_ratio")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            problems.append(f"--{name} must be > 0, got {value}")
    for name in ("wd", "workers", "max_epochs", "beta"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            problems.append(f"--{name} must be >= 0, got {value}")
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not 0.5 < alpha <= 1.0:
        problems.append(f"--alpha must lie in (0.5, 1], got {alpha}")
    return problems
