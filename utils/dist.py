"""Data-parallel training across processes.

Launch with ``torchrun --nproc_per_node=N script.py ...`` (``env://``): NCCL on
GPUs, gloo on CPU. In a single process every helper here is a no-op, so the
scripts read the same with one process or many. The global batch
(``--batch_size``) is split evenly over the processes; DDP averages the
gradients of the processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when torchrun (or another ``env://`` launcher) set WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes; one process: no group, rank 0."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def current_info() -> DistInfo:
    """The DistInfo of an already initialised process group (or of one process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def device_for(requested: str, info: DistInfo) -> torch.device:
    """``--device``, with one GPU per process (``cuda:<local rank>``) under torchrun."""
    device = torch.device(requested)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def wrap(module: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``module`` when there are several processes.

    ``find_unused_parameters``: the value head of the policy never reaches the
    loss, and a block that every image of a batch drops does not run.
    """
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process; ``[obj]`` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a CPU tensor of any length along dim 0 over all processes."""
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def all_true(flag: bool) -> bool:
    """True only if ``flag`` holds on every process (a collective in DDP)."""
    return all(gather_objects(bool(flag)))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
