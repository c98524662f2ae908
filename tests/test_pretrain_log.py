"""pretrain_resnet.py prints the authors' log lines: ``# setting learning_rate to %.2E``
where the learning rate is set, ``loaded pretrained model from <file>`` for
--init_torchvision."""
import argparse

import pytest

import pretrain_resnet
from models import get_spec


def test_the_learning_rate_line_at_epoch_0_and_each_milestone(capsys):
    args = argparse.Namespace(lr=0.1, lr_decay_ratio=0.1, milestones=[2, 4])
    lr_for = pretrain_resnet.lr_schedule(args, is_main=True)
    lrs = [lr_for(e) for e in range(6)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert capsys.readouterr().out.splitlines() == [
        "# setting learning_rate to 1.00E-01", "# setting learning_rate to 1.00E-02",
        "# setting learning_rate to 1.00E-03"]


def test_other_processes_do_not_print_it(capsys):
    args = argparse.Namespace(lr=0.1, lr_decay_ratio=0.1, milestones=[1])
    lr_for = pretrain_resnet.lr_schedule(args, is_main=False)
    assert [lr_for(e) for e in range(2)] == pytest.approx([0.1, 0.01])
    assert capsys.readouterr().out == ""


def test_init_torchvision_says_what_it_loaded(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(pretrain_resnet, "load_base_resnet", lambda r, p: loaded.append(p))
    args = argparse.Namespace(init_torchvision="weights/resnet.pth")
    pretrain_resnet.load_models(args, get_spec("R32_C10"), resuming=False)
    assert loaded == ["weights/resnet.pth"]
    assert capsys.readouterr().out == "loaded pretrained model from weights/resnet.pth\n"
    pretrain_resnet.load_models(args, get_spec("R32_C10"), resuming=True)  # not reloaded
    assert loaded == ["weights/resnet.pth"] and capsys.readouterr().out == ""


@pytest.mark.slow
def test_a_run_prints_the_lines(tiny_args, tmp_path, capsys):
    pretrain_resnet.main(tiny_args(tmp_path / "p", "--epochs", "2", "--milestones", "1"))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("#")] == [
        "# setting learning_rate to 1.00E-01", "# setting learning_rate to 1.00E-02"]
    assert out.index("# setting learning_rate to 1.00E-02") > 0
    assert out[out.index("# setting learning_rate to 1.00E-02") - 1].startswith("E: 0 | A: ")
