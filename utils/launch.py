"""Launching a training script: the one process start every training stage shares.

A script describes itself as a :class:`Script`: its parser, how it loads its
networks, and ``build_stage``, which turns them into the :class:`Plan` the
engine trains. :func:`launch` does the rest, once for all of them:

1. resolve and validate the configuration (``utils.config``), lock the run
   folder (rank 0), remove what killed writes left there, and check it
   (``utils.run_folder``), reading ``last.t7`` (or the newest checkpoint of a
   run killed before its first ``last.t7``) for ``--resume``;
2. join the process group under torchrun, pick the device, seed;
3. load the networks, build the data loaders and the stage, restore a resumed run;
4. write ``config.yaml`` and train (``utils.engine.fit``); a finished run
   resumed with nothing left to do changes nothing;
5. leave the process group and release the lock, whatever happened (SIGTERM
   included).

Every expected failure, from here or from any library module, ends in one line
``<script>: error: <what> (<file>)`` and a non-zero exit (:func:`error_path`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from models import ModelSpec, get_spec
from utils.checkpoint import CheckpointError, NonFiniteError
from utils.config import (ConfigError, config_warnings, resolve, save_config, to_plain,
                          validate)
from utils.data import get_datasets, make_loaders
from utils.dist import DistInfo, cleanup, device_for, init_distributed
from utils.engine import Loop, Stage, fit, restore
from utils.errors import UserError
from utils.run_folder import (LAST, RunFolderError, RunLock, RunLog, acquire_lock,
                              check_run_folder, read_resume_state, remove_orphans)
from utils.seeding import seed_everything, set_deterministic


@dataclass(frozen=True)
class Context:
    """Where this process runs."""

    info: DistInfo
    device: torch.device


@dataclass
class Plan:
    """What ``build_stage`` hands the launcher: the stage and its epochs."""

    stage: Stage
    first_epoch: int  # the first epoch of a fresh run (``--load`` continues a count)
    num_epochs: int  # epochs of the whole run, counted from ``first_epoch``
    test_due: Callable[[int], bool]  # evaluate (and save a checkpoint) after this epoch?


def test_every(every: int) -> Callable[[int], bool]:
    """``test_due`` of a plan that evaluates every ``every`` epochs (epoch 0 included)."""
    return lambda epoch: epoch % every == 0


def _no_problems(args: argparse.Namespace) -> list[str]:
    return []


def _unchanged(args: argparse.Namespace) -> argparse.Namespace:
    return args


@dataclass(frozen=True)
class Script:
    """A training script as data: the launcher runs any of these the same way."""

    prog: str
    build_parser: Callable[[], argparse.ArgumentParser]
    # (args, spec, resuming) -> the networks, loaded as the flags ask (anything build_stage takes)
    load_models: Callable[[argparse.Namespace, ModelSpec, bool], Any]
    # (args, spec, networks, test loader, context) -> Plan
    build_stage: Callable[[argparse.Namespace, ModelSpec, Any, DataLoader, Context], Plan]
    finalize: Callable[[argparse.Namespace], argparse.Namespace] = _unchanged  # derived defaults
    checks: Callable[[argparse.Namespace], list[str]] = _no_problems  # script-specific problems
    # settings that make a run what it is: --resume refuses to change them (lr, batch size... may)
    kept_on_resume: tuple[str, ...] = ("seed",)


# ---------------------------------------------------------------------------
# One error path
# ---------------------------------------------------------------------------


def describe(err: BaseException) -> str:
    """One line for an expected failure: what went wrong, and the file it concerns."""
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: no space left on the device{where}"
        return f"{err.strerror or os.strerror(err.errno)}{where}"
    return str(err)


def is_expected(err: BaseException) -> bool:
    """UserErrors and operating-system errors (disk full, permissions...) are not bugs."""
    return isinstance(err, UserError) or isinstance(err, OSError) and err.errno is not None


@contextlib.contextmanager
def error_path(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn an expected failure into ``<prog>: error: <what> (<file>)`` and exit status 1.

    Bugs keep their traceback; ``--debug`` keeps it for every error.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted into expected failures and bugs below
        if debug or not is_expected(err):
            raise
        sys.exit(f"{prog}: error: {describe(err)}")


# ---------------------------------------------------------------------------
# The steps of a launch
# ---------------------------------------------------------------------------


def flags(script: Script, parser: argparse.ArgumentParser,
          argv: Sequence[str]) -> argparse.Namespace:
    """The configuration from defaults, YAML and flags, validated; problems exit with 2."""
    try:
        args = script.finalize(resolve(parser, argv))
        validate(args, script.prog, script.checks)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    return args


def configure(script: Script, parser: argparse.ArgumentParser, argv: Sequence[str],
              args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """Check the run folder; with ``--resume``, put the saved configuration under the
    YAML and the flags. Returns ``(args, resume_state)``; problems exit with 2."""
    try:
        source = check_run_folder(args.cv_dir, args.resume)
        if source is None:
            return args, None
        state = read_resume_state(source)
        args = script.finalize(resolve(parser, argv, saved=state["config"]))
        if args.model != (state.get("model") or args.model):
            raise CheckpointError(f"{source} was written for model {state['model']}, "
                                  f"not {args.model}")
        check_kept(script, args, state.get("config") or {}, args.cv_dir)
        validate(args, script.prog, script.checks)
    except (ConfigError, RunFolderError, CheckpointError, ValueError) as err:
        parser.error(str(err))
    return args, state


def check_kept(script: Script, args: argparse.Namespace, saved: dict, folder: str) -> None:
    """Refuse a resume that would change what the run is (its method, fixed policy, seed)."""
    changed = [f"--{k} {saved[k]} (not {getattr(args, k, None)})" for k in script.kept_on_resume
               if k in saved and getattr(args, k, None) != saved[k]]
    if changed:
        raise ConfigError(f"--resume continues the run in {folder} as it was started: "
                          f"{', '.join(changed)}; start a new --cv_dir to change that")


def start(args: argparse.Namespace) -> Context:
    """Join the process group (under torchrun), pick the device, seed, set determinism."""
    info = init_distributed(torch.device(args.device).type)
    device = device_for(args.device, info)
    set_deterministic(args.deterministic)
    seed_everything(args.seed, info.rank)
    return Context(info, device)


def loaders_for(args: argparse.Namespace, spec: ModelSpec, ctx: Context):
    """``(train_loader, test_loader, train_sampler)`` of this process."""
    return make_loaders(*get_datasets(spec, args.data_dir, args.download), args.batch_size,
                        args.workers, args.seed, ctx.info.rank, ctx.info.world_size,
                        ctx.device.type == "cuda")


def epochs_of(plan: Plan, state: dict | None) -> tuple[range, int]:
    """The epochs still to run and the run's first epoch; a resumed run restores the stage."""
    first, start_epoch = plan.first_epoch, plan.first_epoch
    if state is not None:
        start_epoch = restore(plan.stage, state, state.get("recovered_from", LAST)) + 1
        first = int(state["first_epoch"])
    return range(start_epoch, first + plan.num_epochs), first


class TrainingStopped(UserError):
    """Training stopped on a non-finite loss or model; the last good state is kept."""


def train(args: argparse.Namespace, plan: Plan, epochs: range, first: int, loader, sampler,
          ctx: Context, state: dict | None) -> None:
    """Write config.yaml, then train; a NaN loss stops with the last good files kept."""
    if ctx.info.is_main:
        save_config(args, args.cv_dir)
    log = RunLog(args.cv_dir, ctx.info.is_main, epochs.start - 1 if state else None)
    loop = Loop(epochs, first, plan.test_due, args.cv_dir, args.model, to_plain(args),
                progress=not args.no_progress)
    try:
        fit(plan.stage, loop, loader, sampler, ctx.device, ctx.info, log,
            state["rng"] if state else None)
    except NonFiniteError as err:  # a NaN loss, or a model that would be saved non-finite
        last = os.path.join(args.cv_dir, LAST)
        kept = (f"the last good state is {last} (continue with --resume once the cause is "
                f"fixed)" if os.path.isfile(last) else
                f"no epoch finished, so {args.cv_dir} holds no state to resume")
        raise TrainingStopped(f"{err}; stopped: {kept}") from None
    finally:
        log.close()


def run(script: Script, args: argparse.Namespace, state: dict | None) -> None:
    """Start the process, build the stage, restore a resumed run and train it."""
    ctx = start(args)
    try:
        spec = get_spec(args.model)
        networks = script.load_models(args, spec, state is not None)
        train_loader, test_loader, sampler = loaders_for(args, spec, ctx)
        plan = script.build_stage(args, spec, networks, test_loader, ctx)
        epochs, first = epochs_of(plan, state)
        if state is not None and not epochs:
            if ctx.info.is_main:
                print(f"{script.prog}: nothing to do: the run in {args.cv_dir} has finished "
                      f"its last epoch ({epochs.start - 1}); raise the number of epochs to "
                      f"continue it. Nothing was changed.", file=sys.stderr)
            return
        train(args, plan, epochs, first, train_loader, sampler, ctx, state)
    finally:
        cleanup()


def is_rank0() -> bool:
    """Rank 0 of a torchrun launch (``RANK``, set before the group is joined), or one process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def locked(folder: str, command: list[str], take: bool) -> Iterator[RunLock | None]:
    """Hold the run folder's lock (when ``take``), released on any exit, SIGTERM included."""
    lock = acquire_lock(folder, command) if take else None
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield lock
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # unwinds through the finally blocks that release the folder


def launch(script: Script, argv: Sequence[str] | None = None) -> None:
    """Run ``script`` with ``argv`` (default: the process's arguments): a script's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = script.build_parser()
    with error_path(script.prog, "--debug" in argv):
        args = flags(script, parser, argv)
        with locked(args.cv_dir, [script.prog, *argv], take=is_rank0()):
            if is_rank0():
                remove_orphans(args.cv_dir)
            args, state = configure(script, parser, argv, args)
            if is_rank0():
                for warning in config_warnings(args):
                    print(f"{script.prog}: warning: {warning}", file=sys.stderr)
            run(script, args, state)
