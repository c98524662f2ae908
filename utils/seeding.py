"""Seeds, deterministic mode and restorable random states.

A resumed run continues exactly where an uninterrupted run would be:

* the training data order is a function of (seed, epoch) (``DistributedSampler``
  with ``set_epoch``), so it has no state to save;
* the sampled block policies ``u ~ Bernoulli(s')`` (paper Sec. 3.3) use noise
  that is a function of (seed, epoch, image index), so they do not depend on
  how the data is split over processes;
* everything else that draws random numbers (augmentation, data-loader worker
  seeds) uses the global generators, whose states are saved with ``last.t7``
  as tensors and plain types, loadable with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed + rank``."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2 ** 32)
    torch.manual_seed(value)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (and no cuDNN autotuning) when ``enabled``."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def rng_state() -> dict[str, Any]:
    """The global random states of this process, as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def keyed_uniform(seed: int, epoch: int, indices: torch.Tensor, width: int) -> torch.Tensor:
    """Uniform [0, 1) noise of shape (len(indices), width), one row per dataset index.

    Row i depends only on (seed, epoch, indices[i]): the same image gets the same
    noise in an epoch whichever process or batch it lands in.
    """
    out = torch.empty(len(indices), width)
    gen = torch.Generator()
    for row, index in enumerate(indices.tolist()):
        gen.manual_seed(hash((seed, epoch, int(index))) % 2 ** 63)
        out[row] = torch.rand(width, generator=gen)
    return out
