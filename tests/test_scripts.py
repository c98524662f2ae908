"""Each training script end to end on tiny generated data (CPU, a few steps)."""
import glob
import json
import os

import pytest
import torch
import yaml

import cl_training
import finetune
import pretrain_resnet
from models import build_resnet, get_model, get_spec
from policies import blockdrop
from utils.checkpoint import load_base_resnet, load_blockdrop_checkpoint, read_checkpoint


def _named(folder):
    return sorted(glob.glob(os.path.join(str(folder), "ckpt_E_*.t7")))


def _metrics(folder):
    with open(os.path.join(str(folder), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cl_run(tiny_data, tmp_path_factory):
    """A finished 3-epoch curriculum run (epochs 0..2, tests at 0 and 2)."""
    cv = tmp_path_factory.mktemp("cl_run")
    cl_training.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--cv_dir",
                      str(cv), "--batch_size", "8", "--workers", "0", "--device", "cpu",
                      "--no_progress", "--base_ckpt", tiny_data["base"], "--max_epochs", "2",
                      "--test_every", "2", "--seed", "3"])
    return cv


def test_cl_training_writes_the_run_folder(cl_run, capsys):
    names = [os.path.basename(p) for p in _named(cl_run)]
    assert len(names) == 2
    assert names[0].startswith("ckpt_E_0_A_") and names[1].startswith("ckpt_E_2_A_")
    ckpt = read_checkpoint(_named(cl_run)[1])
    assert {"agent", "epoch", "reward", "acc"} <= set(ckpt) and "resnet" not in ckpt
    assert ckpt["epoch"] == 2
    _, agent = get_model("R32_C10")
    assert load_blockdrop_checkpoint(_named(cl_run)[1], None, agent) == {"agent": True,
                                                                         "resnet": False}
    lines = _metrics(cl_run)
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert [m["cl_step"] for m in lines] == [1, 2, 3]
    assert "test" in lines[0] and "test" not in lines[1]
    assert lines[2]["test"]["accuracy"] == ckpt["acc"]
    assert set(lines[0]["train"]) >= {"accuracy", "reward", "block_usage", "block_usage_std",
                                      "unique_policies"}
    assert all(m["lr"] == 1e-3 for m in lines)
    with open(os.path.join(str(cl_run), "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["max_epochs"] == 2 and config["seed"] == 3 and config["lr"] == 1e-3
    assert glob.glob(os.path.join(str(cl_run), "log", "events.out.tfevents.*"))
    last = read_checkpoint(os.path.join(str(cl_run), "last.t7"))  # weights_only=True
    assert last["epoch"] == 2 and {"optimizer", "rng", "config", "agent"} <= set(last)


def test_cl_training_logs_the_authors_lines(tiny_data, tiny_args, tmp_path, capsys):
    cl_training.main(tiny_args(tmp_path / "run", "--base_ckpt", tiny_data["base"],
                               "--max_epochs", "0"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# setting learning_rate to 1.00E-03"
    assert out[1] == "training the last 1 blocks ..."
    assert out[2].startswith("E: 0 | A: ") and " | R: " in out[2] and " | #: " in out[2]
    assert out[3].startswith("TS - A: ")


def test_finetune_from_a_curriculum_checkpoint(tiny_data, tiny_args, cl_run, tmp_path):
    pretrained = _named(cl_run)[1]
    cv = tmp_path / "ft"
    finetune.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--pretrained", pretrained,
                            "--max_epochs", "1", "--test_every", "1"))
    ckpts = _named(cv)
    assert len(ckpts) == 2
    final = read_checkpoint(ckpts[-1])
    assert {"agent", "resnet", "epoch", "reward", "acc"} <= set(final)
    start = read_checkpoint(pretrained)["agent"]
    base = read_checkpoint(tiny_data["base"])["state_dict"]
    assert any(not torch.equal(final["agent"][k], start[k]) for k in start)
    assert any(not torch.equal(final["resnet"][k], base[k]) for k in base
               if not k.endswith("num_batches_tracked"))


def test_finetune_load_continues_the_epoch_count(tiny_data, tiny_args, cl_run, tmp_path):
    first = tmp_path / "a"
    finetune.main(tiny_args(first, "--base_ckpt", tiny_data["base"], "--max_epochs", "0"))
    second = tmp_path / "b"
    finetune.main(tiny_args(second, "--load", _named(first)[0], "--max_epochs", "0",
                            "--base_ckpt", "/nonexistent/base.t7"))  # resnet comes from --load
    assert [m["epoch"] for m in _metrics(second)] == [1]


def test_cl_training_load_continues_the_epoch_count(tiny_data, tiny_args, cl_run, tmp_path):
    cv = tmp_path / "cont"
    cl_training.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--load",
                               _named(cl_run)[1], "--max_epochs", "1", "--test_every", "4"))
    lines = _metrics(cv)
    assert [m["epoch"] for m in lines] == [3, 4]
    assert [m["cl_step"] for m in lines] == [4, 5]
    assert "test" in lines[1]


def test_pretrain_writes_a_base_network_the_stages_read(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "pre"
    pretrain_resnet.main(tiny_args(cv, "--epochs", "2", "--test_every", "1"))
    files = sorted(glob.glob(os.path.join(str(cv), "pk_E_*_A_*.t7")))
    assert [os.path.basename(f)[:7] for f in files] == ["pk_E_1_", "pk_E_2_"]
    rnet = build_resnet(get_spec("R32_C10"))
    load_base_resnet(rnet, files[-1])
    config = yaml.safe_load(open(os.path.join(str(cv), "config.yaml")))
    assert config["milestones"] == [1, 1] and config["lr"] == 0.1 and config["wd"] == 1e-4


def test_pretrain_defaults_follow_the_recipe():
    args = pretrain_resnet.fill_recipe(pretrain_resnet.build_parser().parse_args(
        ["--model", "R110_C10"]))
    assert (args.batch_size, args.epochs, args.milestones) == (128, 164, [82, 123])
    assert args.cv_dir == "cv/pretrained/R110_C10"
    args = pretrain_resnet.fill_recipe(pretrain_resnet.build_parser().parse_args(
        ["--model", "R101_ImgNet"]))
    assert (args.batch_size, args.epochs, args.milestones) == (256, 90, [30, 60])


@pytest.mark.parametrize("script", [cl_training, finetune])
def test_resume_equals_an_uninterrupted_run(tiny_data, tiny_args, cl_run, tmp_path, script):
    extra = ["--base_ckpt", tiny_data["base"], "--test_every", "2", "--seed", "5"]
    if script is finetune:
        extra += ["--pretrained", _named(cl_run)[1]]
    straight, split = tmp_path / "straight", tmp_path / "split"
    script.main(tiny_args(straight, *extra, "--max_epochs", "3"))  # epochs 0..3
    script.main(tiny_args(split, *extra, "--max_epochs", "1"))  # epochs 0..1, then killed
    script.main(tiny_args(split, *extra, "--max_epochs", "3", "--resume"))  # 2..3
    a = read_checkpoint(os.path.join(str(straight), "last.t7"))
    b = read_checkpoint(os.path.join(str(split), "last.t7"))
    assert a["epoch"] == b["epoch"] == 3
    for key in ("agent", "resnet") if script is finetune else ("agent",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert [os.path.basename(p) for p in _named(straight)] == \
        [os.path.basename(p) for p in _named(split)]
    strip = [{k: v for k, v in m.items() if k != "time"} for m in _metrics(straight)]
    assert strip == [{k: v for k, v in m.items() if k != "time"} for m in _metrics(split)]


def test_amp_bf16_runs_on_cpu(tiny_data, tiny_args, tmp_path):
    cl_training.main(tiny_args(tmp_path / "amp", "--base_ckpt", tiny_data["base"],
                               "--max_epochs", "0", "--amp", "bf16"))
    assert len(_metrics(tmp_path / "amp")) == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tiny_args, tmp_path,
                                                           monkeypatch, capsys):
    real = blockdrop.curriculum_loss
    calls = {"n": 0}

    def loss_that_turns_nan(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 2 else value  # 2 batches per epoch

    monkeypatch.setattr(blockdrop, "curriculum_loss", loss_that_turns_nan)
    cv = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        cl_training.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "3"))
    assert exit_info.value.code not in (0, None)
    assert "non-finite loss" in str(exit_info.value.code) and "last.t7" in str(exit_info.value.code)
    last = read_checkpoint(os.path.join(str(cv), "last.t7"))
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["agent"].values() if v.is_floating_point())
