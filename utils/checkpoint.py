"""Reading and writing checkpoints in every layout users hold (docs/checkpoints.md).

* BlockDrop stage checkpoints (the authors' and ours): ``agent`` (or ``net`` in
  a few old files) for the policy, ``resnet`` after joint finetuning, plus
  ``epoch``, ``reward``, ``acc``. The authors' files are PyTorch 0.3 pickles:
  legacy (non-zip) serialisation, no ``num_batches_tracked`` buffers.
* Pretrained base ResNets of ``img_classification_pk_pytorch``:
  ``{'state_dict': ..., 'args': Namespace, ...}`` with ``module.`` prefixes
  and torchvision names ``layer<i>.<b>.*``.
* torchvision ResNet state dicts (``resnet101`` for R101, ``resnet18`` to
  initialise the ImageNet policy's ResNet-10).

Everything is read with ``weights_only=True`` and checked key by key before a
single tensor is copied, so a bad file never leaves a half-loaded model. A
state with NaN or infinite values is neither written nor loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import glob
import os
import re
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from utils.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class NonFiniteError(UserError, RuntimeError):
    """A model's parameters or buffers (or a loss) became NaN or infinite."""


_LAYER = re.compile(r"^layer(\d+)\.(\d+)\.(.*)$")
_MAX_LISTED = 12


def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
        return
    if isinstance(obj, Mapping):
        items: Iterable = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def first_non_finite(obj: Any) -> str | None:
    """``"<name> (<n> NaN, <m> inf of <size>)"`` for the first floating-point tensor in
    ``obj`` (a state dict, a checkpoint, nested containers) that is not finite, else None."""
    for name, tensor in _named_tensors(obj):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            return (f"{name} ({nan} NaN, {int((~finite).sum()) - nan} inf of "
                    f"{tensor.numel()} values)")
    return None


def check_model_tag(ckpt: Any, path: str, name: str) -> None:
    """Our checkpoints record their model (``model``); refuse one written for another."""
    if isinstance(ckpt, Mapping) and ckpt.get("model", name) != name:
        raise CheckpointError(f"{path} holds a {ckpt['model']} model, not {name}")


def read_checkpoint(path: str) -> Any:
    """Load ``path`` on the CPU with ``weights_only=True``, or raise CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        # base-network checkpoints of img_classification_pk_pytorch pickle their argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated files, pickles of arbitrary objects, text files...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from err


class _RecordingFile:
    """A binary file that keeps the OSError of a failed write: ``torch.save`` reports it
    (a full disk, say) as a RuntimeError without its errno."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _test_fault(path: str, f) -> None:
    """Test hook: ``BLOCKDROP_TEST_FAULT=<kill|enospc>:<file name pattern>`` kills the
    process (SIGKILL) or fails with ENOSPC halfway through writing a matching checkpoint,
    so that tests can check what a kill or a full disk leaves behind."""
    action, _, pattern = os.environ.get("BLOCKDROP_TEST_FAULT", "").partition(":")
    if not action or not fnmatch.fnmatch(os.path.basename(path), pattern):
        return
    f.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_checkpoint(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save to a temporary file, then rename it to ``path``.

    A crash mid-write leaves the previous file (if any) intact. A tensor with
    NaN or infinite values raises NonFiniteError before anything is written. A
    failed write (disk full, no permission) removes the temporary file and raises
    the OSError, naming ``path``.
    """
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteError(f"not writing {path}: {bad} is not finite; the files already "
                             f"written are kept")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".t7", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _RecordingFile(f)
            try:
                torch.save(obj, out)
            except RuntimeError as err:
                if out.error is None:
                    raise
                raise out.error from err
            _test_fault(path, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, path) from err
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` (left by DataParallel/DDP) from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def torchvision_to_flat(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rename torchvision-style ResNet keys to the flat layout.

    ``layer<i>.<b>.downsample.<n>.*`` -> ``ds.<i-1>.<n>.*``,
    ``layer<i>.<b>.*`` -> ``blocks.<i-1>.<b>.*``; other keys unchanged.
    """
    out: dict[str, Any] = {}
    for key, value in strip_prefix(state).items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        if rest.startswith("downsample."):
            out[f"ds.{stage}.{rest[len('downsample.'):]}"] = value
        else:
            out[f"blocks.{stage}.{block}.{rest}"] = value
    return out


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def fitted_state(module: nn.Module, state: Mapping[str, Any], origin: str,
                 what: str = "model") -> dict[str, Any]:
    """Check ``state`` against ``module`` and return the complete state to load.

    Missing ``num_batches_tracked`` buffers (PyTorch < 0.4 files) keep the
    module's own; any other missing, unexpected or mis-shaped entry raises
    CheckpointError naming ``origin`` (the file the state came from) and the keys.
    """
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{origin}: the {what} entry is not a state dict")
    own = module.state_dict()
    missing = {k for k in own if k not in state and not k.endswith("num_batches_tracked")}
    unexpected = set(state) - set(own)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    wrong = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)]
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{origin} does not fit the {what}: " + "; ".join(problems))
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{origin}: the {what} holds non-finite values, first {bad}; "
                              f"the run that wrote it diverged")
    full = dict(own)
    full.update(state)
    return full


def load_state_strict(module: nn.Module, state: Mapping[str, Any], origin: str,
                      what: str = "model") -> None:
    """Copy ``state`` into ``module`` if every key and shape fits, else copy nothing."""
    module.load_state_dict(fitted_state(module, state, origin, what), strict=True)


def policy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A policy state dict without the ``features.fc.*`` entries some old files carry."""
    return {k: v for k, v in strip_prefix(state).items() if not k.startswith("features.fc.")}


def resnet_state(ckpt: Any) -> dict[str, Any]:
    """The flat-ResNet state dict inside any base-network checkpoint layout."""
    if isinstance(ckpt, Mapping):
        for key in ("state_dict", "resnet", "model"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                return torchvision_to_flat(ckpt[key])
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return torchvision_to_flat(ckpt)
    raise CheckpointError("expected a ResNet state dict, or a dict holding one under "
                          "'state_dict', 'resnet' or 'model'")


def load_base_resnet(rnet: nn.Module, path: str) -> None:
    """Load a pretrained base ResNet (pk layout, torchvision or ours) into ``rnet``."""
    ckpt = read_checkpoint(path)
    try:
        state = resnet_state(ckpt)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    load_state_strict(rnet, state, path, "base ResNet")


def load_torchvision_policy_init(agent: nn.Module, state: Mapping[str, torch.Tensor],
                                 source: str = "torchvision resnet18") -> None:
    """Initialise a policy's feature ResNet from a deeper torchvision ResNet.

    The policy keeps only the first block of each stage (ResNet-18 -> ResNet-10),
    so later blocks and the classifier of the source are left out on purpose;
    the policy heads keep their own initialisation.
    """
    flat = torchvision_to_flat(state)
    features = agent.features
    wanted = features.state_dict()
    kept = {k: v for k, v in flat.items() if k in wanted}
    dropped = [k for k in flat if k not in wanted
               and not k.startswith("fc.") and not re.match(r"blocks\.\d+\.[1-9]\d*\.", k)]
    if dropped:
        raise CheckpointError(f"{source} does not fit the policy features: unexpected keys: "
                              f"{_listing(dropped)}")
    load_state_strict(features, kept, source, "policy features")


def init_policy(agent: nn.Module, spec, path: str | None) -> bool:
    """``--policy_init``: start the policy's features from the torchvision ResNet that
    ``spec.policy.torchvision_init`` names (resnet18 for the ImageNet ResNet-10)."""
    if path is None:
        return False
    if spec.policy.torchvision_init is None:
        raise CheckpointError(f"--policy_init: the policy network of {spec.name} has no "
                              "torchvision counterpart (ImageNet models only)")
    state = read_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    load_torchvision_policy_init(agent, state, path)
    return True


def load_blockdrop_checkpoint(path: str, rnet: nn.Module | None, agent: nn.Module,
                              ckpt: Any = None) -> dict[str, bool]:
    """Load a BlockDrop stage checkpoint into ``agent`` (and ``rnet`` if it holds one).

    Both parts are checked before either is changed. Returns which parts were loaded.
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if not isinstance(ckpt, Mapping) or not any(k in ckpt for k in ("agent", "net", "resnet")):
        found = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a BlockDrop checkpoint: expected the keys "
                              f"'agent' (or 'net') and/or 'resnet', found {found}")
    agent_state = ckpt.get("agent", ckpt.get("net"))
    if "resnet" in ckpt and rnet is None:
        raise CheckpointError(f"{path} holds a ResNet but none was given to load it into")
    # check both parts before changing either, so a bad part loads neither
    parts = []
    if agent_state is not None:
        parts.append((agent, policy_state(agent_state), "policy network"))
    if "resnet" in ckpt:
        parts.append((rnet, torchvision_to_flat(ckpt["resnet"]), "ResNet"))
    loads, errors = [], []
    for module, state, what in parts:
        try:
            loads.append((module, fitted_state(module, state, path, what)))
        except CheckpointError as err:
            errors.append(str(err))
    if errors:
        raise CheckpointError("\n".join(errors))
    for module, state in loads:
        module.load_state_dict(state, strict=True)
    return {"agent": agent_state is not None, "resnet": "resnet" in ckpt}


def default_base_path(spec) -> str:
    """``spec.base_checkpoint``; a glob pattern there (models without released weights)
    names the newest matching file that pretraining wrote, or the pattern if none."""
    pattern = spec.base_checkpoint
    if not glob.has_magic(pattern):
        return pattern
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else pattern


def load_default_base(rnet: nn.Module, spec, path: str | None = None,
                      policy_only: bool = False) -> str:
    """Load the pretrained base ResNet from ``path`` or the spec's default path."""
    path = path or default_base_path(spec)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"base ResNet checkpoint not found: {path} ("
            + ("the checkpoint holds only a policy, so " if policy_only else "")
            + "the pretrained base network is needed; pass --base_ckpt, train one with "
              "pretrain_resnet.py, or unpack the authors' checkpoints into ./cv/)")
    load_base_resnet(rnet, path)
    return path
