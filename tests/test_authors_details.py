"""What the authors' scripts showed a user: their log lines on stdout, Adam as PyTorch 0.3
computed it, and runs that stay what they were when resumed; a pretraining checkpoint
evaluates its own ResNet."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

import cl_training
import finetune
import test as test_script
from helpers import error_line, printed_block
from models import build_resnet, get_spec
from utils.optim import LegacyAdam


def _named(folder) -> str:
    return sorted(glob.glob(os.path.join(str(folder), "ckpt_E_*.t7")))[-1]


@pytest.fixture
def cl_run(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "cl"
    cl_training.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0"))
    return cv


def test_test_py_prints_the_authors_loading_lines_on_stdout(cl_run, tiny_data, capsys):
    path = _named(cl_run)
    capsys.readouterr()
    test_script.main(["--model", "R32_C10", "--load", path, "--data_dir", tiny_data["data_dir"],
                      "--workers", "0", "--base_ckpt", tiny_data["base"]])
    out = capsys.readouterr().out
    assert out.startswith(f"loading checkpoints\nloaded agent from {os.path.basename(path)}\n")
    assert printed_block(out).startswith("\n    Accuracy: ")


def test_finetune_prints_the_pretrained_line_and_the_lr_line(cl_run, tiny_data, tiny_args,
                                                            tmp_path, capsys):
    path = _named(cl_run)
    capsys.readouterr()
    finetune.main(tiny_args(tmp_path / "ft", "--base_ckpt", tiny_data["base"], "--pretrained",
                            path, "--max_epochs", "0", "--no_fold", "--no_channels_last"))
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"loaded pretrained model from {path}",
                       "# setting learning_rate to 1.00E-04"]


def test_the_lr_line_comes_at_each_decay(tiny_data, tiny_args, tmp_path, capsys):
    cl_training.main(tiny_args(tmp_path / "cl", "--base_ckpt", tiny_data["base"],
                               "--max_epochs", "2", "--epoch_step", "2", "--test_every", "5"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert lines == ["# setting learning_rate to 1.00E-03", "# setting learning_rate to 1.00E-04"]


def test_adam_legacy_eps_trains_with_the_old_update(tiny_data, tiny_args, tmp_path, monkeypatch):
    built = []
    original = cl_training.make_adam

    def spy(params, lr, wd, legacy):
        optimizer = original(params, lr, wd, legacy)
        built.append(optimizer)
        return optimizer
    monkeypatch.setattr(cl_training, "make_adam", spy)
    cv = tmp_path / "legacy"
    cl_training.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0",
                               "--adam_legacy_eps"))
    assert isinstance(built[0], LegacyAdam)
    with open(os.path.join(str(cv), "config.yaml")) as f:
        assert yaml.safe_load(f)["adam_legacy_eps"] is True


@pytest.mark.parametrize("change", [["--seed", "1"], ["--k", "5"], ["--policy", "randomk"]])
def test_a_resume_cannot_change_what_the_run_is(change, tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "fixed"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0",
                     "--policy", "firstk", "--k", "7")
    finetune.main(argv)
    config = (cv / "config.yaml").read_text()
    line = error_line(finetune.main, [*argv, "--resume", "--max_epochs", "1", *change], capsys)
    assert "--resume continues the run" in line and change[0] in line
    assert (cv / "config.yaml").read_text() == config
    # a changed learning rate is allowed
    finetune.main([*argv, "--resume", "--max_epochs", "1", "--lr", "5e-5"])


def test_a_pretraining_checkpoint_evaluates_its_own_resnet(tiny_data, tmp_path, capsys):
    spec = get_spec("R32_C10")
    torch.manual_seed(5)
    own = build_resnet(spec)
    pk = str(tmp_path / "pk_E_1_A_0.100.t7")
    torch.save({"state_dict": own.state_dict(), "epoch": 1, "acc": 0.1, "model": "R32_C10"}, pk)
    common = ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--workers", "0"]
    line = error_line(test_script.main, [*common, "--load", pk], capsys)
    assert f"test.py --model R32_C10 --load {pk} --policy firstk --k 15" in line
    test_script.main([*common, "--load", pk, "--policy", "firstk", "--k", "15",
                      "--base_ckpt", tiny_data["base"]])
    from_pk = capsys.readouterr().out
    assert f"loaded resnet from {os.path.basename(pk)}" in from_pk
    # the base network would give another block: the file's own ResNet was evaluated
    own_file = str(tmp_path / "own.t7")
    torch.save({"state_dict": own.state_dict()}, own_file)
    test_script.main([*common, "--policy", "firstk", "--k", "15", "--base_ckpt", own_file])
    assert printed_block(capsys.readouterr().out) == printed_block(from_pk)


def test_test_py_checks_out_before_any_work(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = error_line(test_script.main, ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"],
                                         "--out", str(blocker / "stats.json")], capsys)
    assert "--out" in line and "cannot be created or written" in line
