"""Every checkpoint layout of docs/checkpoints.md loads; bad files fail whole and clearly."""
import argparse
import datetime
import os

import pytest
import torch

from helpers import pk_layout, randomize_bn
from legacy_writer import legacy_state_dict, save_pytorch03
from models import get_model, get_spec
from utils.checkpoint import (CheckpointError, default_base_path, load_base_resnet,
                              load_blockdrop_checkpoint, read_checkpoint, save_checkpoint)


def _same(a, b):
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items()
               if not k.endswith("num_batches_tracked"))


def test_authors_stage_checkpoint_from_pytorch03(tmp_path):
    rnet, agent = get_model("R110_C10")
    randomize_bn(rnet)
    path = str(tmp_path / "ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet),
                    "epoch": 2000, "reward": 0.195, "acc": 0.936}, path)
    r2, a2 = get_model("R110_C10")
    assert load_blockdrop_checkpoint(path, r2, a2) == {"agent": True, "resnet": True}
    assert _same(rnet, r2) and _same(agent, a2)


def test_old_net_key_with_features_fc(tmp_path):
    _, agent = get_model("R32_C10")
    state = legacy_state_dict(agent)
    state["features.fc.weight"] = torch.zeros(10, 64)
    state["features.fc.bias"] = torch.zeros(10)
    path = str(tmp_path / "old.t7")
    save_pytorch03({"net": state, "epoch": 5300}, path)
    _, a2 = get_model("R32_C10")
    assert load_blockdrop_checkpoint(path, None, a2) == {"agent": True, "resnet": False}
    assert _same(agent, a2)


@pytest.mark.parametrize("name", ["R32_C10", "R101_ImgNet"])
def test_pretrained_base_in_pk_layout(tmp_path, name):
    rnet, _ = get_model(name)
    randomize_bn(rnet)
    path = str(tmp_path / "pk.t7")
    save_pytorch03({"args": argparse.Namespace(arch="resnet", depth=32), "epoch": 164,
                    "state_dict": pk_layout(rnet), "best_err1": 7.7}, path)
    r2, _ = get_model(name)
    load_base_resnet(r2, path)
    assert _same(rnet, r2)


def test_torchvision_state_dict_file_and_our_own_format(tmp_path):
    import torchvision
    tv = torchvision.models.resnet101(weights=None)
    path = str(tmp_path / "resnet101.pth")
    torch.save(tv.state_dict(), path)
    rnet, _ = get_model("R101_ImgNet")
    load_base_resnet(rnet, path)
    assert torch.equal(rnet.ds[2][0].weight, tv.layer3[0].downsample[0].weight)
    # this project's own files are written atomically and read back
    own = str(tmp_path / "sub" / "ours.t7")
    save_checkpoint({"resnet": rnet.state_dict(), "epoch": 3}, own)
    r2, _ = get_model("R101_ImgNet")
    load_base_resnet(r2, own)
    assert _same(rnet, r2)
    assert [f for f in os.listdir(tmp_path / "sub")] == ["ours.t7"]


def test_another_models_checkpoint_loads_nothing(tmp_path):
    rnet, agent = get_model("R32_C10")
    path = str(tmp_path / "r32.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet)}, path)
    r110, a110 = get_model("R110_C10")
    before = {k: v.clone() for k, v in a110.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_blockdrop_checkpoint(path, r110, a110)
    msg = str(err.value)
    assert path in msg and "logit.weight" in msg and "missing keys: blocks.0.10" in msg
    assert all(torch.equal(v, a110.state_dict()[k]) for k, v in before.items())


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(str(tmp_path / "missing.t7"))
    text = tmp_path / "notes.t7"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(text))
    rnet, agent = get_model("R32_C10")
    good = tmp_path / "good.t7"
    save_pytorch03({"agent": legacy_state_dict(agent)}, str(good))
    cut = tmp_path / "truncated.t7"
    cut.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match="truncated.t7"):
        read_checkpoint(str(cut))
    torch.save({"epoch": 3}, tmp_path / "nothing.t7")
    with pytest.raises(CheckpointError, match="expected the keys 'agent'"):
        load_blockdrop_checkpoint(str(tmp_path / "nothing.t7"), rnet, agent)


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.t7"
    torch.save({"agent": {}, "payload": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(path))


def test_default_base_of_a_model_without_released_weights(tmp_path, monkeypatch):
    """R56/R50 default to the newest file that pretraining wrote (a glob in the spec)."""
    monkeypatch.chdir(tmp_path)
    spec = get_spec("R56_C10")
    assert default_base_path(spec) == spec.base_checkpoint  # nothing there yet
    folder = tmp_path / "cv" / "pretrained" / "R56_C10"
    folder.mkdir(parents=True)
    for i, name in enumerate(["pk_E_164_A_0.900.t7", "pk_E_164_A_0.800.t7"]):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (1000 + i, 1000 + i))
    assert default_base_path(spec) == "cv/pretrained/R56_C10/pk_E_164_A_0.800.t7"
    assert default_base_path(get_spec("R32_C10")) == get_spec("R32_C10").base_checkpoint
