"""Datasets and transforms of the paper's settings, checked at load time.

CIFAR-10/100 are read from the standard "python version" folders under
``data_dir`` (``cifar-10-batches-py/``, ``cifar-100-python/``). Any files in
that format load, subsets and generated ones included: checksums are not
enforced, and keys may be ``str`` or ``bytes`` (files re-dumped after reading
with ``encoding='bytes'``). Nothing is downloaded unless ``download=True``.
ImageNet is read from ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``.

Everything that can be checked without decoding every image is checked when a
split is loaded, before any epoch: pixel arrays (shape and type), one label
per image, labels inside the model's classes, the number of ImageNet class
folders, that ``val/`` has the class folders of ``train/`` (where both exist),
a non-empty split. ImageNet folders and files whose names start with '.' are
ignored. A JPEG that cannot be decoded is reported when it is read, also from
DataLoader workers. Every problem is a :class:`DataError`
naming the file and what was expected.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from models.specs import ModelSpec
from utils.errors import UserError

CIFAR_PIXELS = 3 * 32 * 32  # one image of a CIFAR row, channel-major
LABEL_KEYS = ("labels", "fine_labels")  # CIFAR-10, CIFAR-100
_WORKER_PREFIX = "Caught "  # how DataLoader re-raises an error of a worker process


class DataError(UserError, RuntimeError):
    """The data folder is missing, or its files do not hold what the model expects.

    Raised in a DataLoader worker, the error reaches the main process with the
    worker's traceback as its message; the original one-line message is kept.
    """

    def __init__(self, *args: Any):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _worker_message(text: str, cls: type) -> str:
    """The original message inside a DataLoader worker's re-raised traceback, else ``text``."""
    if not (text.startswith(_WORKER_PREFIX) and "\nOriginal Traceback" in text):
        return text
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text


def get_transform(spec: ModelSpec, train: bool) -> Callable:
    """The transforms of ``spec.data`` (docs/models.md): optional resize, then a random crop (with
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


# ---------------------------------------------------------------------------
# CIFAR python-version files
# ---------------------------------------------------------------------------


def _read_pickle(path: str, expected: str) -> dict[str, Any]:
    """A pickled dict with ``str`` keys (``bytes`` keys decoded), or DataError."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except OSError:
        raise
    except Exception as err:  # truncated or corrupt pickles fail in many ways
        detail = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"{path} is not a readable CIFAR python-version file "
                        f"({type(err).__name__}: {detail}); expected {expected}") from None
    if not isinstance(entry, Mapping):
        raise DataError(f"{path} holds a {type(entry).__name__}; expected {expected}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in entry.items()}


def _as_array(path: str, what: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged lists
        raise DataError(f"{path}: '{what}' is not an array ({err})") from None


def _is_integer(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer) or array.size == 0


def _value_range(array: np.ndarray) -> tuple[int, int]:
    return (int(array.min()), int(array.max())) if array.size else (0, 0)


def cifar_pixels(path: str, value: Any) -> np.ndarray:
    """``data`` of a CIFAR file as (N, 3072) uint8, or DataError naming ``path``."""
    data = _as_array(path, "data", value)
    if data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise DataError(f"{path}: 'data' has shape {data.shape}; expected (N, {CIFAR_PIXELS}), "
                        f"one row of 3x32x32 pixels per image")
    if not _is_integer(data):
        raise DataError(f"{path}: 'data' holds {data.dtype} values; expected uint8 pixels "
                        f"0..255")
    low, high = _value_range(data)
    if low < 0 or high > 255:
        raise DataError(f"{path}: 'data' holds values from {low} to {high}; expected uint8 "
                        f"pixels 0..255")
    return data.astype(np.uint8, copy=False)


def cifar_labels(path: str, key: str, value: Any, num_images: int, num_classes: int,
                 model: str) -> np.ndarray:
    """``labels``/``fine_labels`` as int64 (N,), checked against the images and classes."""
    labels = _as_array(path, key, value)
    if labels.ndim != 1 or not _is_integer(labels):
        raise DataError(f"{path}: '{key}' holds {labels.dtype} values of shape {labels.shape}; "
                        f"expected a list of integer class indices")
    if len(labels) != num_images:
        raise DataError(f"{path}: {len(labels)} labels for {num_images} images; expected one "
                        f"label per image")
    low, high = _value_range(labels)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{path}: label {bad} is outside 0..{num_classes - 1}, the "
                        f"{num_classes} classes of {model}")
    return labels.astype(np.int64, copy=False)


def read_cifar_file(path: str, num_classes: int,
                    model: str = "the model") -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (N, 3072) uint8, labels (N,) int64)`` of one CIFAR python-version file."""
    expected = "a pickled dict with 'data' (N x 3072 uint8) and 'labels' or 'fine_labels'"
    entry = _read_pickle(path, expected)
    key = next((k for k in LABEL_KEYS if k in entry), None)
    if "data" not in entry or key is None:
        found = ", ".join(sorted(entry)[:8]) or "none"
        raise DataError(f"{path}: keys {found}; expected {expected}")
    data = cifar_pixels(path, entry["data"])
    return data, cifar_labels(path, key, entry[key], len(data), num_classes, model)


def _layout(stock: type) -> tuple[str, list, list, dict]:
    """torchvision's file names of a CIFAR variant: folder, train files, test files, meta."""
    return stock.base_folder, stock.train_list, stock.test_list, stock.meta


class CifarFiles(tvd.VisionDataset):
    """One split of a CIFAR python-version folder, checked as it is read.

    Each file must hold ``data``, N rows of 3x32x32 uint8 pixels (channel-major;
    other integer types with values 0..255 are converted), and N integer labels
    in 0..num_classes-1 under ``labels`` or ``fine_labels``. The optional meta
    file must name ``num_classes`` classes.
    """

    base_folder: ClassVar[str]
    train_list: ClassVar[list]
    test_list: ClassVar[list]
    meta: ClassVar[dict]

    def __init__(self, root: str, train: bool, num_classes: int,
                 transform: Callable | None = None, model: str = "the model"):
        super().__init__(root, transform=transform)
        self.train = train
        folder = os.path.join(root, self.base_folder)
        parts = [read_cifar_file(os.path.join(folder, name), num_classes, model)
                 for name, _ in (self.train_list if train else self.test_list)]
        pixels = np.concatenate([p for p, _ in parts])
        self.data = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision
        self.targets = [int(y) for _, labels in parts for y in labels]
        self.classes = self._class_names(os.path.join(folder, self.meta["filename"]),
                                         num_classes, model)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _class_names(self, path: str, num_classes: int, model: str) -> list[str]:
        if not os.path.isfile(path):
            return [str(i) for i in range(num_classes)]
        key = self.meta["key"]
        names = _read_pickle(path, f"a pickled dict with '{key}'").get(key)
        if names is None or len(names) != num_classes:
            found = "no" if names is None else len(names)
            raise DataError(f"{path}: {found} class names under '{key}'; expected "
                            f"{num_classes}, the classes of {model}")
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class CIFAR10Files(CifarFiles):
    base_folder, train_list, test_list, meta = _layout(tvd.CIFAR10)


class CIFAR100Files(CifarFiles):
    base_folder, train_list, test_list, meta = _layout(tvd.CIFAR100)


_CIFAR = {"cifar10": (CIFAR10Files, tvd.CIFAR10, "CIFAR-10"),
          "cifar100": (CIFAR100Files, tvd.CIFAR100, "CIFAR-100")}


def _split_name(train: bool) -> str:
    return "training" if train else "test"


def _cifar(spec: ModelSpec, data_dir: str, train: bool, download: bool) -> Dataset:
    cls, stock, title = _CIFAR[spec.data.kind]
    if download:
        stock(root=data_dir, train=train, download=True)
    folder = os.path.join(data_dir, cls.base_folder)
    files = [name for name, _ in (cls.train_list if train else cls.test_list)]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"{title} {_split_name(train)} data not found: expected the python-version "
            f"files {', '.join(files)} in {folder}/ (missing: {', '.join(missing)}). "
            f"Pass --download to fetch the dataset, or --data_dir to point at it.")
    dataset = cls(data_dir, train, spec.num_classes, get_transform(spec, train), spec.name)
    if len(dataset) == 0:
        raise DataError(f"{folder}: the {_split_name(train)} files {', '.join(files)} hold no "
                        f"images; expected at least one")
    return dataset


# ---------------------------------------------------------------------------
# ImageNet folders
# ---------------------------------------------------------------------------


def read_image(path: str) -> Image.Image:
    """An RGB image, or DataError naming ``path`` when it cannot be read or decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read the image ({err})") from None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def class_folders(folder: str) -> list[str]:
    """The class folders of an ImageNet-style split, sorted as labels number them: every
    sub-folder whose name does not start with '.' (``.ipynb_checkpoints``, ``.Trash-1000``
    and the like are not classes)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not _hidden(e.name))


class ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder without hidden entries: hidden folders are not classes,
    and hidden files (``._img.JPEG`` written by macOS) or files under hidden sub-folders
    are not images."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    def __init__(self, root: str, transform: Callable, loader: Callable[[str], Any]):
        def is_image(path: str) -> bool:
            inside = os.path.relpath(path, root).split(os.sep)[1:]  # below the class folder
            return (not any(_hidden(part) for part in inside)
                    and tvd.folder.has_file_allowed_extension(path, tvd.folder.IMG_EXTENSIONS))
        # class folders may be empty (a subset keeps every class's number)
        super().__init__(root, transform, loader=loader, is_valid_file=is_image,
                         allow_empty=True)


def _split_folder(data_dir: str, train: bool) -> str:
    return os.path.join(data_dir, "train" if train else "val")


def _imagenet(spec: ModelSpec, data_dir: str, train: bool, download: bool) -> Dataset:
    if download:
        raise DataError("ImageNet cannot be downloaded automatically; see README")
    folder = _split_folder(data_dir, train)
    if not os.path.isdir(folder):
        raise DataError(f"ImageNet {'training' if train else 'validation'} folder not found: "
                        f"expected {folder}/<class>/<image> (one sub-folder per class)")
    check_class_folders(data_dir)  # also when only val/ is read: it must match training
    try:
        dataset = ImageFolder(folder, get_transform(spec, train), loader=read_image)
    except (OSError, RuntimeError) as err:
        raise DataError(f"{folder}: {err}") from None
    if len(dataset.classes) != spec.num_classes:
        raise DataError(f"{folder}: {len(dataset.classes)} class folders; expected "
                        f"{spec.num_classes}, the classes of {spec.name} (one sub-folder per "
                        f"class, all present, so that labels keep their numbers; folders "
                        f"starting with '.' are not counted)")
    if len(dataset) == 0:
        raise DataError(f"{folder}: no images in its class folders; expected at least one")
    return dataset


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                      else "")


def check_class_folders(data_dir: str) -> None:
    """``val/`` must have the class folders of ``train/``: a class missing from one or
    an extra one in the other would shift every later label. Raises DataError naming the
    validation folder and the classes that differ."""
    train, val = _split_folder(data_dir, True), _split_folder(data_dir, False)
    if not (os.path.isdir(train) and os.path.isdir(val)):
        return  # the split readers say which folder is missing
    try:
        ours, theirs = class_folders(train), class_folders(val)
    except OSError as err:
        raise DataError(f"{err.filename}: cannot list its class folders ({err.strerror})"
                        ) from None
    if ours == theirs:
        return
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    parts = []
    if missing:
        parts.append(f"missing {_listed(missing)}")
    if extra:
        parts.append(f"not in {train}: {_listed(extra)}")
    raise DataError(f"{val}: its class folders differ from those of {train} "
                    f"({'; '.join(parts)}); "
                    f"expected the same class folders in both, so that labels keep their "
                    f"numbers")


def _same_classes(train: Dataset, test: Dataset, data_dir: str) -> None:
    """Both splits must number the same classes alike (ImageNet's train/ and val/ list
    their class folders separately)."""
    ours, theirs = getattr(train, "classes", None), getattr(test, "classes", None)
    if ours != theirs:
        missing = sorted(set(ours or []) - set(theirs or []))
        extra = sorted(set(theirs or []) - set(ours or []))
        raise DataError(f"{data_dir}: the training and test splits name their classes "
                        f"differently (only in training: {_listed(missing) or 'none'}; only "
                        f"in test: {_listed(extra) or 'none'}); expected the same names")


# spec.data.kind -> reader(spec, data_dir, train, download)
READERS = {"cifar10": _cifar, "cifar100": _cifar, "image_folder": _imagenet}


def get_dataset(spec: ModelSpec, data_dir: str, train: bool, download: bool = False) -> Dataset:
    """The training or test split of ``spec``'s dataset with its transforms, checked."""
    return READERS[spec.data.kind](spec, data_dir, train, download)


def get_datasets(spec: ModelSpec, data_dir: str, download: bool = False) -> tuple[Dataset, Dataset]:
    """``(trainset, testset)`` of ``spec``'s dataset."""
    train = get_dataset(spec, data_dir, True, download)
    test = get_dataset(spec, data_dir, False, download)
    _same_classes(train, test, data_dir)
    return train, test


def write_cifar_folder(root: str, images, labels, train: bool, num_classes: int = 10,
                       batches: int = 1) -> str:
    """Write uint8 images (N, 32, 32, 3) and labels as CIFAR python-version files.

    Training data is split over ``data_batch_1..batches`` (CIFAR-10 needs 5,
    CIFAR-100 one ``train`` file). Returns the dataset folder. Used by the demo
    and the tests to make data that the real loader reads.
    """
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
    if len(testset) < world:
        raise DataError(f"the test set holds {len(testset)} images, fewer than the {world} "
                        f"processes; expected at least one image per process")
    per_rank = batch_size // world
    sampler = DistributedSampler(IndexedDataset(trainset), num_replicas=world, rank=rank,
                                 shuffle=True, seed=seed, drop_last=False)
    train = DataLoader(IndexedDataset(trainset), batch_size=per_rank, sampler=sampler,
                       num_workers=workers, pin_memory=pin_memory, drop_last=False)
    test = DataLoader(testset, batch_size=per_rank,
                      sampler=ShardSampler(len(testset), rank, world),
                      num_workers=workers, pin_memory=pin_memory)
    return train, test, sampler
