"""Mixed precision: the one ``autocast`` every training and timing path uses."""
from __future__ import annotations

import contextlib

import torch


def autocast(amp: str, device: torch.device):
    """``torch.autocast`` in bfloat16 for ``amp == "bf16"``, else a no-op context."""
    if amp == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
