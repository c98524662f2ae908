"""Shared fixtures: tiny CIFAR-format data and base networks made in a temp folder."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_resnet, get_spec  # noqa: E402
from utils.data import write_cifar_folder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A CIFAR-10 folder with 16 training and 8 test images, and a random R32_C10 base."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.RandomState(0)
    write_cifar_folder(str(root), rng.randint(0, 256, (16, 32, 32, 3)), rng.randint(0, 10, 16),
                       train=True)
    write_cifar_folder(str(root), rng.randint(0, 256, (8, 32, 32, 3)), rng.randint(0, 10, 8),
                       train=False)
    torch.manual_seed(0)
    base = os.path.join(str(root), "base_R32_C10.t7")
    torch.save({"state_dict": build_resnet(get_spec("R32_C10")).state_dict()}, base)
    return {"data_dir": str(root), "base": base}


@pytest.fixture
def tiny_args(tiny_data):
    """``tiny_args(cv_dir, *extra)``: the flags every tiny run shares (R32_C10, batch 8,
    CPU, no workers, no progress bars, deterministic)."""
    def make(cv_dir, *extra: str) -> list:
        return ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--cv_dir",
                str(cv_dir), "--batch_size", "8", "--workers", "0", "--device", "cpu",
                "--no_progress", "--deterministic", *extra]
    return make
