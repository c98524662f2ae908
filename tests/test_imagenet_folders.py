"""ImageNet-style folders that are not what they claim are refused before any epoch:
hidden folders are not classes, and val/ must have the class folders of train/ (a class
missing or added on one side would shift every later label)."""
import os

import numpy as np
import pytest
from PIL import Image

from models import get_spec
from utils.data import DataError, get_dataset, get_datasets

IMAGENET = get_spec("R101_ImgNet")


def _tree(root, splits=("train", "val"), classes=1000):
    """Class folders ``n0000..``; one small JPEG in n0000 and n0001 of each split."""
    rng = np.random.RandomState(0)
    for split in splits:
        for i in range(classes):
            os.makedirs(root / split / f"n{i:04d}")
        for cls in ("n0000", "n0001"):
            pixels = rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / cls / "img.jpg")
    return root


def _refused(root, **kw):
    with pytest.raises(DataError) as info:
        get_datasets(IMAGENET, str(root), **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_hidden_folders_are_not_classes(tmp_path):
    _tree(tmp_path)
    for split in ("train", "val"):  # a notebook's checkpoints, a desktop's trash
        os.makedirs(tmp_path / split / ".ipynb_checkpoints")
        Image.new("RGB", (8, 8)).save(tmp_path / split / ".ipynb_checkpoints" / "a.jpg")
    os.makedirs(tmp_path / "val" / ".Trash-1000")
    train, val = get_datasets(IMAGENET, str(tmp_path))
    assert len(train.classes) == len(val.classes) == 1000
    assert train.classes[0] == "n0000" and [y for _, y in val.samples] == [0, 1]


def test_hidden_files_and_folders_inside_a_class_are_not_images(tmp_path):
    _tree(tmp_path, splits=("val",))
    (tmp_path / "val" / "n0000" / "._img.jpg").write_bytes(b"\0\5\x16\7 macOS resource fork")
    os.makedirs(tmp_path / "val" / "n0001" / ".thumbs")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n0001" / ".thumbs" / "img.jpg")
    val = get_dataset(IMAGENET, str(tmp_path), train=False)
    assert [os.path.relpath(p, tmp_path) for p, _ in val.samples] == [
        os.path.join("val", "n0000", "img.jpg"), os.path.join("val", "n0001", "img.jpg")]


def test_a_class_missing_from_val_is_named(tmp_path):
    _tree(tmp_path)
    os.rmdir(tmp_path / "val" / "n0500")
    assert _refused(tmp_path) == (
        f"{tmp_path}/val: its class folders differ from those of {tmp_path}/train (missing "
        f"n0500); expected the same class folders in both, so that labels keep their numbers")


def test_an_extra_class_in_val_is_named(tmp_path):
    _tree(tmp_path)
    os.makedirs(tmp_path / "val" / "n9999")
    assert f"(not in {tmp_path}/train: n9999)" in _refused(tmp_path)


def test_a_renamed_class_is_refused_also_when_only_val_is_read(tmp_path):
    """Same count, other names: test.py reads val/ alone, and its labels would shift."""
    _tree(tmp_path)
    os.rename(tmp_path / "val" / "n0005", tmp_path / "val" / "x0005")
    with pytest.raises(DataError) as info:
        get_dataset(IMAGENET, str(tmp_path), train=False)
    assert str(info.value).startswith(
        f"{tmp_path}/val: its class folders differ from those of {tmp_path}/train (missing "
        f"n0005; not in {tmp_path}/train: x0005)")


def test_many_differences_are_counted_not_listed(tmp_path):
    _tree(tmp_path)
    for i in range(990, 1000):
        os.rmdir(tmp_path / "val" / f"n{i:04d}")
    assert "(missing n0990, n0991, n0992, n0993, n0994 and 5 more)" in _refused(tmp_path)


def test_a_class_count_other_than_the_models_is_refused(tmp_path):
    _tree(tmp_path, classes=999)
    os.makedirs(tmp_path / "train" / ".cache")  # not counted
    assert _refused(tmp_path) == (
        f"{tmp_path}/train: 999 class folders; expected 1000, the classes of R101_ImgNet (one "
        f"sub-folder per class, all present, so that labels keep their numbers; folders "
        f"starting with '.' are not counted)")
