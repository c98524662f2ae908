"""Configuration of the scripts: flags, resolution and validation (docs/training.md).

Every script builds its parser with :func:`make_parser` (no abbreviated flags:
``--policy`` is never read as ``--policy_init``) and the shared argument groups
below. Values are resolved in this order, later layers winning:

    argparse defaults  ->  saved run config (``--resume``)  ->  YAML (``--config``)
    ->  command-line flags that were given explicitly

Every YAML key must be the name of a flag (``batch_size``, ``lr``, ...). The
resolved configuration is written as ``config.yaml`` into the run folder
before the first training step.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn
from collections.abc import Callable, Mapping, Sequence

import torch
import yaml

from models import MODEL_SPECS, get_spec
from models.fast import FastOptions
from policies.fixed import check_k
from policies.registry import (DEFAULT_METHOD, add_method_options, chosen_method, get_method,
                               method_names, option_problems)
from policies.source import PolicySourceError
from utils.errors import UserError

# keys that steer this invocation or describe this machine: never taken from a saved config
RUN_CONTROL_KEYS = ("config", "resume", "device", "workers", "no_progress", "debug")


class ConfigError(UserError, ValueError):
    """A configuration file is unreadable or names unknown settings."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _convert(action: argparse.Action, value: Any) -> Any:
    if value is None:
        if action.default is not None:
            raise ValueError("expected a value, got null")
        return value
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"expected one value, got a {type(value).__name__}")
    if action.type is None:
        if not isinstance(value, str):
            raise ValueError("expected text (quote it in YAML)")
    elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a {action.type.__name__}")
    elif isinstance(value, str) or action.type is float and isinstance(value, int):
        value = action.type(value)
    elif action.type is int and not isinstance(value, int):
        raise ValueError("expected an integer")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


def _coerce(action: argparse.Action, value: Any, source: str) -> Any:
    """Convert a YAML value with the flag's own type (YAML reads ``1e-3`` as a string);
    a value of the wrong kind (null for a flag with a default, a list for one value, a
    number for a path, a choice not offered) is refused like a bad flag."""
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
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
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


class Parser(argparse.ArgumentParser):
    """``argparse`` without abbreviations, whose errors are one line: ``<prog>: error: <what>``."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(prog: str, description: str) -> Parser:
    """The parser of a script: flags must be spelled out in full."""
    return Parser(prog, description)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="R110_C10", help=f"one of {', '.join(MODEL_SPECS)}")


def add_authors_args(p: argparse.ArgumentParser, *, lr: float, epoch_step: int,
                     max_epochs: int, penalty: float, load_help: str) -> None:
    """The flags cl_training.py and finetune.py share, with the script's defaults."""
    add_model_arg(p)
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay")
    p.add_argument("--data_dir", default="data/", help="data directory")
    p.add_argument("--load", default=None, help=load_help)
    p.add_argument("--cv_dir", default="cv/tmp/",
                   help="run folder: checkpoints, config.yaml, metrics.jsonl, log/")
    p.add_argument("--batch_size", type=int, default=256,
                   help="global batch size (split over processes under torchrun)")
    p.add_argument("--epoch_step", type=int, default=epoch_step,
                   help="epochs after which lr is decayed")
    p.add_argument("--max_epochs", type=int, default=max_epochs,
                   help="epochs to run after the first one (the authors' loop runs "
                        "max_epochs + 1 epochs)")
    p.add_argument("--lr_decay_ratio", type=float, default=0.1,
                   help="lr *= lr_decay_ratio every epoch_step epochs")
    add_parallel_arg(p)
    p.add_argument("--penalty", type=float, default=penalty,
                   help="gamma: reward for incorrect predictions")
    p.add_argument("--alpha", type=float, default=0.8, help="probability bounding factor")
    p.add_argument("--adam_legacy_eps", action="store_true",
                   help="Adam as PyTorch 0.3 computed it (the authors' runs): eps added to "
                        "sqrt(v) before bias correction (docs/training.md)")


def add_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", action="store_true",
                   help="use all GPUs: launch with torchrun --nproc_per_node=<GPUs> (implied "
                        "under torchrun; without it, a machine with several GPUs is refused "
                        "with the command to run, one GPU runs as usual)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--workers`` and ``--debug``: shared by every script, test.py included."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes per process")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of its one-line message")


def add_run_args(p: argparse.ArgumentParser, test_every: int = 10,
                 base_ckpt: bool = True) -> None:
    """The options this project adds to every training script."""
    p.add_argument("--config", default=None,
                   help="YAML of option values (defaults < YAML < flags given explicitly)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (exactly reproducible runs, slower)")
    add_device_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --cv_dir from its last.t7")
    if base_ckpt:
        p.add_argument("--base_ckpt", default=None,
                       help="pretrained base ResNet, used unless a checkpoint holds a 'resnet' "
                            "(default: the model's path under cv/pretrained/)")
    p.add_argument("--test_every", type=int, default=test_every,
                   help="evaluate and save a checkpoint every this many epochs")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bfloat16 autocast for the forward passes (GPU; allowed on CPU)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")


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


def config_warnings(args: argparse.Namespace) -> list[str]:
    """Values that are allowed but probably not meant."""
    penalty = getattr(args, "penalty", None)
    if penalty is not None and penalty > 0:
        return [f"--penalty {penalty} is positive: a wrong prediction is rewarded (the paper's "
                f"gamma is a negative penalty, e.g. --penalty -5)"]
    return []


def check_parallel(args: argparse.Namespace, prog: str) -> list[str]:
    """``--parallel`` outside torchrun on a machine with several GPUs: say how to launch."""
    several = torch.cuda.device_count() > 1
    if getattr(args, "parallel", False) and several and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return [f"--parallel: launch with torchrun --nproc_per_node="
                f"{torch.cuda.device_count()} {prog} ... to use every GPU"]
    return []


def device_problems(name: str) -> list[str]:
    """``--device``: a device torch knows, and CUDA only where it is available."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return [f"--device {name} is not a device (expected cpu, cuda or cuda:<index>)"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {name}: CUDA is not available on this machine (use --device cpu)"]
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return [f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)"]
    return []


def validate(args: argparse.Namespace, prog: str,
             extra: Callable[[argparse.Namespace], list[str]] = lambda args: []) -> None:
    """Raise ConfigError naming every problem of the resolved configuration."""
    get_spec(args.model)  # an unknown model raises ValueError listing the valid ones
    problems = (check_common(args) + list(extra(args)) + check_parallel(args, prog)
                + device_problems(args.device))
    if problems:
        raise ConfigError("; ".join(problems))


def add_method_args(p: argparse.ArgumentParser, fixed_policies: bool = False) -> None:
    """``--agent`` (the learned method that decides), every method's own options and,
    for finetuning, ``--policy``/``--k`` (a fixed rule the ResNet is trained under)."""
    p.add_argument("--agent", choices=method_names(learned=True), default=DEFAULT_METHOD,
                   help="the learned method: " + "; ".join(
                       f"{n}: {get_method(n).summary}" for n in method_names(learned=True))
                   + ". Checkpoints record it")
    if fixed_policies:
        p.add_argument("--policy", choices=method_names(learned=False), default=None,
                       help="train the ResNet alone, with cross-entropy, under this fixed "
                            "policy (Table 1's ft columns; no policy network); --seed picks "
                            "randomk's draw")
        p.add_argument("--k", type=int, default=None,
                       help="blocks the fixed --policy keeps, 1..K")
    add_method_options(p)


def method_problems(args: argparse.Namespace) -> list[str]:
    """The chosen method's option checks; ``--policy`` needs a ``--k`` in 1..K and trains
    no agent; ``--k`` needs ``--policy``."""
    fixed = getattr(args, "policy", None)
    problems = option_problems(args, chosen_method(args).name)
    if fixed is None:
        given_k = getattr(args, "k", None) is not None
        return problems + (["--k applies to a fixed --policy"] if given_k else [])
    spec = get_spec(args.model)
    if args.k is None:
        problems.append(f"--policy {fixed} needs --k: an integer between 1 and "
                        f"{spec.num_blocks}")
    else:
        try:
            check_k(args.k, spec.num_blocks, spec.name)
        except PolicySourceError as err:
            problems.append(str(err))
    for flag, given in (("--agent", args.agent != DEFAULT_METHOD),
                        ("--pretrained", getattr(args, "pretrained", None))):
        if given:
            problems.append(f"--policy {fixed} trains no agent; leave out {flag}")
    return problems


def add_fast_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that turn the inference optimisations off (models.fast)."""
    parser.add_argument("--no_fold", action="store_true",
                        help="keep BatchNorm separate at inference (default: folded into the "
                             "convolutions; same function up to float rounding)")
    parser.add_argument("--no_channels_last", action="store_true",
                        help="keep the NCHW layout at inference (default on CPU: channels_last)")


def fast_options(args: argparse.Namespace) -> FastOptions:
    """The FastOptions of parsed :func:`add_fast_flags` arguments."""
    return FastOptions(fold_bn=not getattr(args, "no_fold", False),
                       channels_last=False if getattr(args, "no_channels_last", False) else None)
