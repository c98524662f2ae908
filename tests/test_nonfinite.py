"""No checkpoint with NaN or infinite tensors is written or used (docs/reliability.md).

A huge learning rate makes BatchNorm running variances overflow while the loss
stays finite; the run must stop in one line with the last good files kept.
An infinite learning rate, or NaN policy probabilities, take the clean
non-finite-loss stop. test.py refuses a non-finite checkpoint and one written
for another model.
"""
import glob
import hashlib
import os

import pytest
import torch

import cl_training
import finetune
import test as test_script
from helpers import error_line
from models import get_model
from utils.checkpoint import (CheckpointError, NonFiniteError, first_non_finite,
                              load_blockdrop_checkpoint, save_checkpoint)
from policies.blockdrop import curriculum_train_step, finetune_train_step
from policies.rewards import policy_log_prob
from utils.engine import NonFiniteLossError, train_epoch


def _digests(folder):
    """The checkpoints and metrics of a run folder, with their content hashes."""
    files = glob.glob(os.path.join(str(folder), "*.t7")) + [os.path.join(str(folder),
                                                                         "metrics.jsonl")]
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in files}


def test_first_non_finite_names_the_tensor():
    state = {"a": torch.ones(3), "b": {"w": torch.tensor([1.0, float("inf"), float("nan")])},
             "steps": torch.tensor([7]), "note": "text"}
    assert first_non_finite(state) == "b.w (1 NaN, 1 inf of 3 values)"
    assert first_non_finite({"a": torch.ones(2), "n": [torch.zeros(1)]}) is None


def test_save_checkpoint_refuses_a_non_finite_state_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.t7"
    save_checkpoint({"agent": {"w": torch.ones(2)}}, str(path))
    before = path.read_bytes()
    with pytest.raises(NonFiniteError, match=r"not writing .*last\.t7: agent\.w \(1 NaN"):
        save_checkpoint({"agent": {"w": torch.tensor([0.0, float("nan")])}}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.t7"]  # no temporary file left


def test_huge_lr_stops_when_batchnorm_overflows(tiny_data, tiny_args, tmp_path, capsys):
    """Epoch 0 is good; the resumed run at lr 1e12 overflows BatchNorm variances in
    epoch 1 (its loss stays finite): it stops, and the run folder is left as it was."""
    cv = tmp_path / "ft"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0")
    finetune.main(argv)
    before = _digests(cv)
    line = error_line(finetune.main, tiny_args(cv, "--resume", "--max_epochs", "1",
                                               "--lr", "1e12"), capsys)
    assert "non-finite model after epoch 1: " in line and "running_var" in line
    assert _digests(cv) == before  # no ckpt_E_1, the same last.t7 and metrics.jsonl
    assert "last.t7" in before and [k[:7] for k in before if k.startswith("ckpt")] == ["ckpt_E_"]


def test_huge_lr_in_the_first_epoch_writes_no_checkpoint(tiny_data, tiny_args, tmp_path,
                                                         capsys):
    cv = tmp_path / "ft"
    line = error_line(finetune.main, tiny_args(cv, "--base_ckpt", tiny_data["base"],
                                               "--max_epochs", "1", "--lr", "1e12"), capsys)
    assert "non-finite model after epoch 0" in line
    assert not glob.glob(os.path.join(str(cv), "*.t7"))


@pytest.mark.parametrize("main", [cl_training.main, finetune.main])
def test_infinite_lr_takes_the_clean_stop(main, tiny_data, tiny_args, tmp_path, capsys):
    line = error_line(main, tiny_args(tmp_path / "r", "--base_ckpt", tiny_data["base"],
                                      "--lr", "inf", "--max_epochs", "0"), capsys)
    assert "non-finite loss (nan)" in line


@pytest.mark.parametrize("stage", ["curriculum", "finetune"])
def test_nan_policy_probabilities_give_a_non_finite_loss(stage):
    torch.manual_seed(0)
    rnet, agent = get_model("R32_C10")
    with torch.no_grad():
        agent.logit.bias[3] = float("nan")
    inputs, targets = torch.rand(4, 3, 32, 32), torch.arange(4)
    optimizer = torch.optim.Adam(agent.parameters())

    def step(x, y, indices):
        noise = torch.full((len(x), agent.num_blocks), 0.5)
        if stage == "curriculum":
            return curriculum_train_step(rnet.eval(), agent, x, y, noise, alpha=0.8, beta=0.1,
                                         penalty=-5.0, cl_step=15)
        return finetune_train_step(rnet.train(), agent, x, y, noise, alpha=0.8, penalty=-5.0)

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at batch 0"):
        train_epoch(step, [(inputs, targets, torch.arange(4))], optimizer, torch.device("cpu"),
                    progress=False)
    assert torch.isfinite(agent.logit.weight).all()  # no update was made


def test_policy_log_prob_is_binary_cross_entropy_where_finite():
    """The NaN guard changes nothing for valid probabilities: same values, same gradients."""
    g = torch.Generator().manual_seed(0)
    probs = (0.2 + 0.6 * torch.rand(8, 15, generator=g)).requires_grad_()
    policy = (torch.rand(8, 15, generator=g) < 0.5).float()
    ours = policy_log_prob(probs, policy)
    reference = -torch.nn.functional.binary_cross_entropy(probs, policy, reduction="none")
    assert torch.equal(ours, reference)
    assert torch.equal(*(torch.autograd.grad(v.sum(), probs)[0] for v in (ours, reference)))
    nan = probs.detach().clone()
    nan[2, 4] = float("nan")
    out = policy_log_prob(nan, policy)
    assert out[2, 4].isnan() and out.isnan().sum() == 1


def _blockdrop_file(path, model="R32_C10", poison=None, **extra):
    torch.manual_seed(0)
    rnet, agent = get_model("R32_C10")
    state = {"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 0,
             "model": model, **extra}
    if poison:
        part, key = poison
        state[part][key] = torch.full_like(state[part][key], float("inf"))
    torch.save(state, path)
    return str(path)


def _test_argv(tiny_data, load):
    return ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--load", load,
            "--device", "cpu", "--workers", "0", "--batch_size", "8"]


def test_test_script_refuses_non_finite_tensors(tiny_data, tmp_path, capsys):
    path = _blockdrop_file(tmp_path / "bad.t7", poison=("resnet", "blocks.1.2.bn2.running_var"))
    line = error_line(test_script.main, _test_argv(tiny_data, path), capsys)
    assert path in line and "non-finite" in line
    assert "blocks.1.2.bn2.running_var (0 NaN, 32 inf of 32 values)" in line


def test_loading_a_non_finite_agent_for_training_is_refused(tmp_path):
    path = _blockdrop_file(tmp_path / "bad.t7", poison=("agent", "logit.bias"))
    rnet, agent = get_model("R32_C10")
    with pytest.raises(CheckpointError, match="policy network holds non-finite values, first "
                                              "logit.bias"):
        load_blockdrop_checkpoint(path, rnet, agent)


def test_test_script_checks_the_model_tag(tiny_data, tmp_path, capsys):
    """Same shapes, other dataset: an agent saved for R32_C100 is not an R32_C10 agent."""
    other = _blockdrop_file(tmp_path / "c100.t7", model="R32_C100")
    line = error_line(test_script.main, _test_argv(tiny_data, other), capsys)
    assert f"{other} holds a R32_C100 model, not R32_C10" in line
    own = _blockdrop_file(tmp_path / "c10.t7")
    test_script.main(_test_argv(tiny_data, own))
    assert "Accuracy:" in capsys.readouterr().out
