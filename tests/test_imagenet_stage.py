"""The ImageNet setting end to end on a tiny image folder: R101 base from a torchvision
state dict, the policy's ResNet-10 from a torchvision resnet18 file (nothing downloaded)."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import cl_training
from helpers import error_line
from utils.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for i in range(1000):  # every class folder, images in two of them
            os.makedirs(root / split / f"n{i:04d}")
        for cls in ("n0000", "n0001"):
            pixels = rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / cls / "img.png")
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), root / "r101.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "r18.pth")
    return root


def test_cl_training_on_imagenet_layout(imagenet_folder, tmp_path):
    root = imagenet_folder
    cv = tmp_path / "cl"
    cl_training.main(["--model", "R101_ImgNet", "--data_dir", str(root), "--cv_dir", str(cv),
                      "--base_ckpt", str(root / "r101.pth"), "--policy_init", str(root / "r18.pth"),
                      "--batch_size", "2", "--max_epochs", "0", "--workers", "0",
                      "--device", "cpu", "--no_progress"])
    ckpt = read_checkpoint(glob.glob(str(cv / "ckpt_E_0_*.t7"))[0])
    assert ckpt["agent"]["logit.weight"].shape == (33, 512)
    start = torch.load(root / "r18.pth")
    # it started from resnet18, and one Adam step (lr 1e-3) moved it by about the lr
    moved = ckpt["agent"]["features.conv1.weight"] - start["conv1.weight"]
    assert 0 < moved.abs().max() <= 1.1e-3


def test_a_corrupt_jpeg_stops_training_in_one_line(imagenet_folder, tmp_path, capsys):
    """Read by a DataLoader worker during the first epoch: one line naming the file."""
    root = tmp_path / "data"
    shutil.copytree(imagenet_folder / "train", root / "train")
    shutil.copytree(imagenet_folder / "val", root / "val")
    bad = root / "train" / "n0001" / "img.png"
    bad.write_bytes(bad.read_bytes()[:60])
    line = error_line(cl_training.main, [
        "--model", "R101_ImgNet", "--data_dir", str(root), "--cv_dir", str(tmp_path / "cl"),
        "--base_ckpt", str(imagenet_folder / "r101.pth"), "--policy_init", "random",
        "--batch_size", "2", "--max_epochs", "0", "--workers", "2", "--device", "cpu",
        "--no_progress"], capsys)
    assert str(bad) in line and "cannot read the image" in line
    assert not glob.glob(str(tmp_path / "cl" / "*.t7"))


def test_a_corrupt_jpeg_stops_test_py_in_one_line(imagenet_folder, tmp_path, capsys):
    """The same through test.py's evaluation: one line naming the file, no traceback."""
    import test as test_script

    root = tmp_path / "data"
    shutil.copytree(imagenet_folder / "val", root / "val")
    bad = root / "val" / "n0000" / "img.png"
    bad.write_bytes(bad.read_bytes()[:60])
    line = error_line(test_script.main, [
        "--model", "R101_ImgNet", "--data_dir", str(root),
        "--base_ckpt", str(imagenet_folder / "r101.pth"), "--batch_size", "2",
        "--workers", "2", "--device", "cpu"], capsys)
    assert line.startswith("test.py: error:") and str(bad) in line


PEERS = [("skipnet", ["--agent", "skipnet"]), ("skipnet_ff", ["--agent", "skipnet_ff"]),
         ("convnet_aig", ["--agent", "convnet_aig"]), ("act", ["--agent", "act"]),
         ("stochastic_depth", ["--stochastic_depth", "0.5"])]


@pytest.mark.slow
@pytest.mark.parametrize("name,flags", PEERS, ids=[p[0] for p in PEERS])
def test_each_peer_finetunes_and_evaluates_on_r101(name, flags, imagenet_folder, tmp_path,
                                                   capsys):
    """ResNet-101 at 224 px: one finetuning epoch of two images, its checkpoint read back
    by test.py (the method from the checkpoint alone)."""
    import finetune
    import test as test_script
    from policies.registry import get_method, method_of

    root, cv = imagenet_folder, tmp_path / name
    finetune.main(["--model", "R101_ImgNet", "--data_dir", str(root), "--cv_dir", str(cv),
                   "--base_ckpt", str(root / "r101.pth"), "--batch_size", "2", "--max_epochs",
                   "0", "--workers", "0", "--device", "cpu", "--no_progress", *flags])
    path = glob.glob(str(cv / "ckpt_E_0_*.t7"))[0]
    assert method_of(read_checkpoint(path)) is get_method(name)
    capsys.readouterr()
    extra = ["--policy", "everyother", "--k", "17"] if name == "stochastic_depth" else []
    test_script.main(["--model", "R101_ImgNet", "--data_dir", str(root), "--load", path,
                      "--workers", "0", "--device", "cpu", "--batch_size", "2", *extra])
    out = capsys.readouterr().out
    assert "Accuracy: " in out and "Block Usage: " in out
