"""Bad input stops the scripts with a clear message before any training step."""
import os

import pytest
import torch

import cl_training
import finetune
import pretrain_resnet
from models import build_resnet, get_model, get_spec


def _fails(main, argv, message, capsys, code=None):
    with pytest.raises(SystemExit) as info:
        main(argv)
    status = info.value.code
    assert status not in (0, None)
    if code is not None:  # sys.exit("message") exits with status 1
        assert status == code or (code == 1 and isinstance(status, str))
    text = (status if isinstance(status, str) else "") + capsys.readouterr().err
    assert message in text, text


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-0.001"], "--lr must be > 0"),
    (["--batch_size", "0"], "--batch_size must be > 0"),
    (["--alpha", "0.5"], "--alpha must lie in (0.5, 1]"),
    (["--alpha", "1.2"], "--alpha must lie in (0.5, 1]"),
    (["--model", "R50_C10"], "unknown model 'R50_C10'; valid names: R32_C10"),
    (["--max_epochs", "-1"], "--max_epochs must be >= 0"),
    (["--test_every", "0"], "--test_every must be > 0"),
])
@pytest.mark.parametrize("main", [cl_training.main, finetune.main])
def test_invalid_values_exit_before_training(main, extra, message, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    _fails(main, tiny_args(cv, *extra), message, capsys, code=2)
    assert not os.path.exists(cv / "metrics.jsonl")


def test_pretrain_invalid_values(tiny_args, tmp_path, capsys):
    _fails(pretrain_resnet.main, tiny_args(tmp_path / "p", "--epochs", "0"),
           "--epochs must be >= 1", capsys, code=2)
    _fails(pretrain_resnet.main, tiny_args(tmp_path / "p", "--init_torchvision", "x.pth"),
           "has no torchvision counterpart", capsys, code=2)


def test_missing_data(tiny_data, tiny_args, tmp_path, capsys):
    argv = tiny_args(tmp_path / "r", "--base_ckpt", tiny_data["base"])
    argv[argv.index("--data_dir") + 1] = str(tmp_path / "nodata")
    _fails(cl_training.main, argv, "data not found", capsys, code=1)


def test_pretrained_that_is_not_a_policy_checkpoint(tiny_data, tiny_args, tmp_path, capsys):
    _fails(finetune.main, tiny_args(tmp_path / "ft", "--base_ckpt", tiny_data["base"],
                                    "--pretrained", tiny_data["base"]),
           "is not a policy checkpoint", capsys, code=1)
    junk = tmp_path / "junk.t7"
    junk.write_text("not a checkpoint")
    _fails(finetune.main, tiny_args(tmp_path / "ft2", "--base_ckpt", tiny_data["base"],
                                    "--pretrained", str(junk)),
           "is not a readable PyTorch checkpoint", capsys, code=1)


def test_load_of_another_models_checkpoint(tiny_data, tiny_args, tmp_path, capsys):
    _, agent = get_model("R32_C10")
    r32 = tmp_path / "r32.t7"
    torch.save({"agent": agent.state_dict(), "epoch": 4, "reward": 0.0, "acc": 0.0}, r32)
    base110 = tmp_path / "base110.t7"
    torch.save({"state_dict": build_resnet(get_spec("R110_C10")).state_dict()}, base110)
    argv = tiny_args(tmp_path / "x", "--base_ckpt", str(base110), "--load", str(r32))
    argv[argv.index("R32_C10")] = "R110_C10"
    _fails(cl_training.main, argv, "does not fit the policy network", capsys, code=1)
    # same shapes, other model: our checkpoints name their model
    torch.save({"agent": agent.state_dict(), "epoch": 4, "model": "R32_C100"}, r32)
    _fails(cl_training.main, tiny_args(tmp_path / "y", "--base_ckpt", tiny_data["base"],
                                       "--load", str(r32)),
           "holds a R32_C100 model, not R32_C10", capsys, code=1)


def test_an_existing_run_is_never_overwritten(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0")
    cl_training.main(argv)
    before = {p: os.path.getmtime(cv / p) for p in os.listdir(cv) if p.endswith(".t7")}
    _fails(cl_training.main, argv, "already holds checkpoints", capsys, code=2)
    assert before == {p: os.path.getmtime(cv / p) for p in os.listdir(cv) if p.endswith(".t7")}
    _fails(finetune.main, tiny_args(cv, "--resume"), "was written by the 'cl' stage", capsys,
           code=1)


def test_resume_without_a_run(tiny_args, tmp_path, capsys):
    _fails(cl_training.main, tiny_args(tmp_path / "empty", "--resume"), "no last.t7", capsys,
           code=2)


def test_parallel_without_torchrun_on_several_gpus_says_how_to_run(tiny_args, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _fails(cl_training.main, tiny_args(tmp_path / "p", "--parallel"),
           "launch with torchrun --nproc_per_node=4", capsys, code=2)
