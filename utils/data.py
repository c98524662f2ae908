"""Datasets and transforms of the paper's settings (SPEC sections 1 and 7).

CIFAR-10/100 are read from the standard "python version" folders under
``data_dir`` (``cifar-10-batches-py/``, ``cifar-100-python/``). Any files in
that format load, subsets and generated ones included: checksums are not
enforced. Nothing is downloaded unless ``download=True``. ImageNet is read
from ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``.
"""
from __future__ import annotations

from utils.errors import UserError

import os
import pickle
from collections.abc import Callable

import torchvision.datasets as tvd
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from models.specs import ModelSpec


class DataError(UserError, RuntimeError):
    """The data folder is missing or does not hold the expected files."""


def get_transform(spec: ModelSpec, train: bool) -> Callable:
    """SPEC section 1, from ``spec.data``: optional resize, then a random crop (with
    padding) and flip for training or a centre crop for testing (none without a
    resize); normalisation only where the base network was trained with it."""
    data = spec.data
    ops: list[Callable] = [T.Resize(data.resize)] if data.resize else []
    if train:
        ops += [T.RandomCrop(data.image_size, padding=data.crop_padding or None),
                T.RandomHorizontalFlip()]
    elif data.resize:
        ops.append(T.CenterCrop(data.image_size))
    ops.append(T.ToTensor())
    if data.mean is not None:
        ops.append(T.Normalize(data.mean, data.std))
    return T.Compose(ops)


class _AnyCifarFiles:
    """Mixin: accept any files in the CIFAR python format, checksums not enforced."""

    def _check_integrity(self) -> bool:
        files = self.train_list if self.train else self.test_list
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in files)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        num = int(max(self.targets)) + 1 if len(self.targets) else 0
        self.classes = [str(i) for i in range(num)]
        if os.path.isfile(path):
            with open(path, "rb") as f:
                self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10Files(_AnyCifarFiles, tvd.CIFAR10):
    pass


class CIFAR100Files(_AnyCifarFiles, tvd.CIFAR100):
    pass


_CIFAR = {"cifar10": (CIFAR10Files, tvd.CIFAR10, "CIFAR-10"),
          "cifar100": (CIFAR100Files, tvd.CIFAR100, "CIFAR-100")}


def _cifar(spec: ModelSpec, data_dir: str, train: bool, download: bool) -> Dataset:
    cls, stock, title = _CIFAR[spec.data.source]
    if download:
        stock(root=data_dir, train=train, download=True)
    folder = os.path.join(data_dir, cls.base_folder)
    files = [name for name, _ in (cls.train_list if train else cls.test_list)]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"{title} "
            f"{'training' if train else 'test'} data not found: expected the python-version "
            f"files {', '.join(files)} in {folder}/ (missing: {', '.join(missing)}). "
            f"Pass --download to fetch the dataset, or --data_dir to point at it.")
    return cls(root=data_dir, train=train, transform=get_transform(spec, train))


def _imagenet(spec: ModelSpec, data_dir: str, train: bool, download: bool) -> Dataset:
    if download:
        raise DataError("ImageNet cannot be downloaded automatically; see README")
    folder = os.path.join(data_dir, "train" if train else "val")
    if not os.path.isdir(folder):
        raise DataError(f"ImageNet {'training' if train else 'validation'} folder not found: "
                        f"expected {folder}/<class>/<image> (one sub-folder per class)")
    try:
        return tvd.ImageFolder(folder, get_transform(spec, train))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{folder}: {err}") from None


# spec.data.source -> reader(spec, data_dir, train, download)
SOURCES = {"cifar10": _cifar, "cifar100": _cifar, "image_folder": _imagenet}


def get_dataset(spec: ModelSpec, data_dir: str, train: bool, download: bool = False) -> Dataset:
    """The training or test split of ``spec``'s dataset with its transforms."""
    return SOURCES[spec.data.source](spec, data_dir, train, download)


def get_datasets(spec: ModelSpec, data_dir: str, download: bool = False) -> tuple[Dataset, Dataset]:
    """``(trainset, testset)`` of ``spec``'s dataset."""
    return get_dataset(spec, data_dir, True, download), get_dataset(spec, data_dir, False, download)


def write_cifar_folder(root: str, images, labels, train: bool, num_classes: int = 10,
                       batches: int = 1) -> str:
    """Write uint8 images (N, 32, 32, 3) and labels as CIFAR python-version files.

    Training data is split over ``data_batch_1..batches`` (CIFAR-10 needs 5,
    CIFAR-100 one ``train`` file). Returns the dataset folder. Used by the demo
    and the tests to make data that the real loader reads.
    """
    import numpy as np  # local: only the writers need it

    cls = CIFAR10Files if num_classes == 10 else CIFAR100Files
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    images = np.asarray(images, dtype=np.uint8)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    names = [n for n, _ in (cls.train_list if train else cls.test_list)]
    chunks = np.array_split(np.arange(len(images)), len(names))
    for name, idx in zip(names, chunks, strict=True):
        with open(os.path.join(folder, name), "wb") as f:
            batch_labels = [int(y) for y in np.asarray(labels)[idx]]
            pickle.dump({"data": flat[idx], label_key: batch_labels}, f)
    meta_key = cls.meta["key"]
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(num_classes)]}, f)
    return folder


class IndexedDataset(Dataset):
    """Yields ``(image, label, index)``: the index keys the per-image policy noise."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, in order, without padding (evaluation)."""

    def __init__(self, size: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(trainset: Dataset, testset: Dataset, batch_size: int, workers: int, seed: int,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
    """``(train_loader, test_loader, train_sampler)`` for one process of ``world``.

    ``batch_size`` is the global batch, split evenly over the processes. The
    training order is a permutation seeded by ``seed + epoch`` (call
    ``train_sampler.set_epoch``), the same for any number of processes: the
    global batch t holds the same images. Training batches are
    ``(images, labels, indices)``.
    """
    if batch_size % world:
        raise ValueError(f"--batch_size {batch_size} must be divisible by the number of "
                         f"processes ({world})")
    per_rank = batch_size // world
    sampler = DistributedSampler(IndexedDataset(trainset), num_replicas=world, rank=rank,
                                 shuffle=True, seed=seed, drop_last=False)
    train = DataLoader(IndexedDataset(trainset), batch_size=per_rank, sampler=sampler,
                       num_workers=workers, pin_memory=pin_memory, drop_last=False)
    test = DataLoader(testset, batch_size=per_rank,
                      sampler=ShardSampler(len(testset), rank, world),
                      num_workers=workers, pin_memory=pin_memory)
    return train, test, sampler
