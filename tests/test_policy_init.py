"""The ImageNet policy starts from torchvision's resnet18 by default (paper Sec. 4.1):
from the torch hub cache, else a one-line stop naming --policy_init torchvision/PATH/random.
Nothing is downloaded: a fake cache file is planted in a temporary TORCH_HOME."""
import pytest
import torch
import torchvision

import cl_training
from helpers import error_line
from models import build_policy, get_spec
from utils.checkpoint import init_policy
from policies.policy_init import PolicyInitError, resolve_policy_init

R101 = get_spec("R101_ImgNet")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _plant(torch_home):
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, folder / "resnet18-f37072fd.pth")
    return folder / "resnet18-f37072fd.pth", state


def test_default_uses_the_hub_cache(torch_home):
    path, state = _plant(torch_home)
    assert resolve_policy_init(R101, None) == str(path)
    agent = build_policy(R101)
    assert init_policy(agent, R101, resolve_policy_init(R101, None))
    assert torch.equal(agent.features.conv1.weight, state["conv1.weight"])
    assert torch.equal(agent.features.blocks[3][0].conv2.weight, state["layer4.0.conv2.weight"])


def test_without_the_cache_it_stops_with_the_three_choices(torch_home):
    with pytest.raises(PolicyInitError) as err:
        resolve_policy_init(R101, None)
    text = str(err.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-*.pth") in text
    for choice in ("--policy_init torchvision", "--policy_init PATH", "--policy_init random"):
        assert choice in text


def test_explicit_choices(torch_home, tmp_path):
    assert resolve_policy_init(R101, "random") is None
    assert resolve_policy_init(R101, None, default_from_cache=False) is None
    with pytest.raises(PolicyInitError, match="no such file"):
        resolve_policy_init(R101, str(tmp_path / "missing.pth"))
    cifar = get_spec("R110_C10")
    assert resolve_policy_init(cifar, None) is None and resolve_policy_init(cifar, "random") is None
    with pytest.raises(PolicyInitError, match="ImageNet models only"):
        resolve_policy_init(cifar, "torchvision")


def test_cl_training_stops_before_anything_without_weights(torch_home, tmp_path, capsys):
    argv = ["--model", "R101_ImgNet", "--data_dir", str(tmp_path / "nodata"), "--cv_dir",
            str(tmp_path / "cl"), "--device", "cpu", "--workers", "0", "--no_progress"]
    line = error_line(cl_training.main, argv, capsys)
    assert "--policy_init torchvision" in line and "hub cache" in line
    _plant(torch_home)  # with the cache, it goes on (and stops later at the missing base)
    line = error_line(cl_training.main, argv, capsys)
    assert "policy_init" not in line and "base ResNet checkpoint not found" in line
