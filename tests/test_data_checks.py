"""Data is checked when it is loaded, before any epoch: every bad file gives one
DataError line naming the file and what was expected; bytes-keyed CIFAR pickles load."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import DataLoader

import cl_training
from helpers import error_line, make_cifar
from models import get_spec
from utils.data import DataError, get_dataset, get_datasets, get_transform, make_loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C10 = get_spec("R32_C10")
C100 = get_spec("R32_C100")
IMAGENET = get_spec("R101_ImgNet")


def _test_batch(root):
    return os.path.join(str(root), "cifar-10-batches-py", "test_batch")


def _rewrite(path, change):
    """Load a CIFAR file, let ``change`` edit its dict, write it back."""
    with open(path, "rb") as f:
        entry = pickle.load(f)
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _refused(root, spec=C10, train=False) -> str:
    with pytest.raises(DataError) as info:
        get_dataset(spec, str(root), train=train)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_generated_files_load_as_torchvision_reads_them(tmp_path, monkeypatch):
    make_cifar(tmp_path, n=12, seed=1)
    ours = get_dataset(C10, str(tmp_path), train=False)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args: True)  # other checksums
    stock = tvd.CIFAR10(str(tmp_path), train=False, transform=get_transform(C10, False))
    assert np.array_equal(ours.data, stock.data) and ours.targets == stock.targets
    assert ours.classes == stock.classes == [f"class{i}" for i in range(10)]
    for i in (0, 3, 11):
        assert torch.equal(ours[i][0], stock[i][0]) and ours[i][1] == stock[i][1]


def test_bytes_keyed_pickles_load(tmp_path):
    """Files re-dumped after reading with encoding='bytes' have b'data', b'labels'."""
    make_cifar(tmp_path / "str", n=10, seed=2)
    make_cifar(tmp_path / "bytes", n=10, seed=2)
    folder = tmp_path / "bytes" / "cifar-10-batches-py"
    for name in ("test_batch", "batches.meta"):
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        entry = {k.encode(): ([n.encode() for n in v] if k == "label_names" else v)
                 for k, v in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    as_bytes = get_dataset(C10, str(tmp_path / "bytes"), train=False)
    as_str = get_dataset(C10, str(tmp_path / "str"), train=False)
    assert np.array_equal(as_bytes.data, as_str.data) and as_bytes.targets == as_str.targets
    assert as_bytes.classes == as_str.classes


def test_bytes_keyed_cifar100_loads(tmp_path):
    make_cifar(tmp_path, n=10, num_classes=100, seed=3)
    path = tmp_path / "cifar-100-python" / "test"
    _rewrite(path, lambda e: e.update({b"data": e.pop("data"),
                                       b"fine_labels": e.pop("fine_labels")}))
    assert len(get_dataset(C100, str(tmp_path), train=False)) == 10


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_truncated_or_corrupt_pickle(tmp_path, cut):
    make_cifar(tmp_path, n=10)
    path = _test_batch(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * cut) if cut < 1 else cut])
    message = _refused(tmp_path)
    assert path in message and "not a readable CIFAR python-version file" in message


def test_a_pickle_that_is_not_a_dict(tmp_path):
    make_cifar(tmp_path, n=4)
    with open(_test_batch(tmp_path), "wb") as f:
        pickle.dump([1, 2, 3], f)
    assert "holds a list; expected a pickled dict" in _refused(tmp_path)


@pytest.mark.parametrize("change, expected", [
    (lambda e: e.update(data=e["data"].astype(np.float32) / 255),
     "'data' holds float32 values; expected uint8 pixels 0..255"),
    (lambda e: e.update(data=e["data"].reshape(-1, 3, 32, 32)),
     "'data' has shape (6, 3, 32, 32); expected (N, 3072)"),
    (lambda e: e.update(data=e["data"][:, :1024]), "has shape (6, 1024); expected (N, 3072)"),
    (lambda e: e.update(data=e["data"].astype(np.int64) * 2),
     "expected uint8 pixels 0..255"),
    (lambda e: e.update(labels=e["labels"][:4]), "4 labels for 6 images"),
    (lambda e: e.update(labels=e["labels"] + [1]), "7 labels for 6 images"),
    (lambda e: e.update(labels=[float(y) for y in e["labels"]]),
     "expected a list of integer class indices"),
    (lambda e: e.pop("labels"), "expected a pickled dict with 'data'"),
    (lambda e: e.update(labels=[50] + e["labels"][1:]),
     "label 50 is outside 0..9, the 10 classes of R32_C10"),
    (lambda e: e.update(labels=[-1] + e["labels"][1:]), "label -1 is outside 0..9"),
])
def test_bad_arrays_and_labels(tmp_path, change, expected):
    make_cifar(tmp_path, n=6)
    _rewrite(_test_batch(tmp_path), change)
    message = _refused(tmp_path)
    assert expected in message and _test_batch(tmp_path) in message


def test_integer_pixels_in_range_are_accepted(tmp_path):
    make_cifar(tmp_path / "a", n=6)
    make_cifar(tmp_path / "b", n=6)
    _rewrite(_test_batch(tmp_path / "b"), lambda e: e.update(data=e["data"].astype(np.int64),
                                                             labels=np.array(e["labels"])))
    a, b = (get_dataset(C10, str(tmp_path / x), train=False) for x in "ab")
    assert np.array_equal(a.data, b.data) and a.targets == b.targets


def test_cifar100_labels_in_a_cifar10_folder(tmp_path):
    """A CIFAR-100 file copied under cifar-10-batches-py/: fine_labels up to 99."""
    make_cifar(tmp_path / "c100", n=300, num_classes=100, seed=4)
    make_cifar(tmp_path, n=6)
    with open(tmp_path / "c100" / "cifar-100-python" / "test", "rb") as src:
        open(_test_batch(tmp_path), "wb").write(src.read())
    message = _refused(tmp_path)
    assert "is outside 0..9, the 10 classes of R32_C10" in message


def test_cifar100_folder_with_all_classes_loads(tmp_path):
    make_cifar(tmp_path, n=300, num_classes=100, seed=4)
    testset = get_dataset(C100, str(tmp_path), train=False)
    assert len(testset.classes) == 100 and max(testset.targets) > 9


def test_meta_file_with_another_number_of_classes(tmp_path):
    make_cifar(tmp_path, n=6)
    meta = os.path.join(str(tmp_path), "cifar-10-batches-py", "batches.meta")
    with open(meta, "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(100)]}, f)
    assert "100 class names under 'label_names'; expected 10" in _refused(tmp_path)


def test_an_empty_test_set_is_found_at_load_time(tmp_path):
    make_cifar(tmp_path, n=6)
    _rewrite(_test_batch(tmp_path), lambda e: e.update(data=e["data"][:0], labels=[]))
    message = _refused(tmp_path)
    assert "hold no images; expected at least one" in message


def test_training_with_an_empty_test_set_stops_before_the_first_epoch(tiny_data, tiny_args,
                                                                      tmp_path, capsys):
    data = tmp_path / "data"
    make_cifar(data, n=8, train=True)
    make_cifar(data, n=4)
    _rewrite(_test_batch(data), lambda e: e.update(data=e["data"][:0], labels=[]))
    argv = tiny_args(tmp_path / "run", "--base_ckpt", tiny_data["base"])
    argv[argv.index("--data_dir") + 1] = str(data)
    line = error_line(cl_training.main, argv, capsys)
    assert "test_batch" in line and "hold no images" in line
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_fewer_test_images_than_processes():
    data = list(range(3))
    with pytest.raises(DataError, match="3 images, fewer than the 4 processes"):
        make_loaders(data, data, batch_size=4, workers=0, seed=0, rank=0, world=4)


def test_test_script_prints_one_line_for_a_corrupt_pickle(tiny_data, tmp_path):
    """The real process: non-zero exit, one stderr line naming the file, no traceback."""
    make_cifar(tmp_path, n=6)
    path = _test_batch(tmp_path)
    open(path, "wb").write(open(path, "rb").read()[:100])
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "test.py"), "--model", "R32_C10", "--data_dir",
         str(tmp_path), "--base_ckpt", tiny_data["base"], "--device", "cpu", "--workers", "0"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and path in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# ImageNet folders
# ---------------------------------------------------------------------------


def imagenet_tree(root, classes=1000, images=("n0000", "n0001"), splits=("train", "val")):
    """Class folders ``n0000..``; one small JPEG in each class named in ``images``."""
    rng = np.random.RandomState(0)
    for split in splits:
        for i in range(classes):
            os.makedirs(os.path.join(str(root), split, f"n{i:04d}"))
        for cls in images:
            pixels = rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(str(root), split, cls, "img.jpg"))
    return str(root)


def test_imagenet_folder_with_every_class_loads(tmp_path):
    train, val = get_datasets(IMAGENET, imagenet_tree(tmp_path))
    assert len(train.classes) == 1000 and len(val) == 2 and val[1][1] == 1


def test_two_class_imagenet_folder_for_a_1000_class_model(tmp_path):
    imagenet_tree(tmp_path, classes=2)
    with pytest.raises(DataError) as info:
        get_dataset(IMAGENET, str(tmp_path), train=False)
    assert str(info.value) == (
        f"{tmp_path}/val: 2 class folders; expected 1000, the classes of R101_ImgNet (one "
        f"sub-folder per class, all present, so that labels keep their numbers; folders "
        f"starting with '.' are not counted)")


def test_imagenet_train_and_val_with_other_class_names(tmp_path):
    imagenet_tree(tmp_path, splits=("train",))
    imagenet_tree(tmp_path, splits=("val",), images=())
    os.rename(tmp_path / "val" / "n0005", tmp_path / "val" / "x0005")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n0000" / "a.jpg")
    with pytest.raises(DataError, match="its class folders differ from those of .*train "
                                        r"\(missing n0005; not in .*: x0005\)"):
        get_datasets(IMAGENET, str(tmp_path))


def test_imagenet_folder_without_images(tmp_path):
    imagenet_tree(tmp_path, images=())
    with pytest.raises(DataError, match="no images in its class folders"):
        get_dataset(IMAGENET, str(tmp_path), train=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_named_when_read(tmp_path, workers):
    imagenet_tree(tmp_path, splits=("val",))
    bad = os.path.join(str(tmp_path), "val", "n0001", "img.jpg")
    open(bad, "wb").write(open(bad, "rb").read()[:200])  # truncated
    valset = get_dataset(IMAGENET, str(tmp_path), train=False)  # nothing decoded yet
    assert valset[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError) as info:
        for _ in DataLoader(valset, batch_size=1, num_workers=workers):
            pass
    assert str(info.value).startswith(f"{bad}: cannot read the image (")
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_an_image(tmp_path):
    imagenet_tree(tmp_path, splits=("val",))
    bad = tmp_path / "val" / "n0000" / "notes.jpg"
    bad.write_text("not a JPEG")
    valset = get_dataset(IMAGENET, str(tmp_path), train=False)
    with pytest.raises(DataError, match=f"^{bad}: cannot read the image"):
        [valset[i] for i in range(len(valset))]
