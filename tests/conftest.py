"""Shared fixtures (tiny CIFAR-format data and base networks made in a temp folder) and the
markers: ``slow`` tests run only with ``--runslow``; ``gpu`` tests only where CUDA is;
``long`` tests (a minute or more) are started first, so that the parallel workers
(pytest-xdist, ``-n`` in pyproject.toml) finish together.

Each worker computes on one thread, and so do the scripts the tests start
(``OMP_NUM_THREADS``, unless it is set already): two workers on two cores."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models import build_resnet, get_spec
from utils.data import write_cifar_folder

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (skipped by default)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests unless --runslow is given and ``gpu`` tests without CUDA; put
    ``long`` tests first (the order is otherwise kept)."""
    skips = []
    if not config.getoption("--runslow"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with --runslow")))
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="gpu: CUDA is not available")))
    for item in items:
        for marker, skip in skips:
            if marker in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: "long" not in item.keywords)


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
