"""BlockDrop-seq through cl_training.py / finetune.py, and fixed-policy finetuning."""
import glob
import os

import pytest
import torch

import cl_training
import finetune
import test as test_script
from models import build_resnet, get_spec
from policies.seq import build_seq_agent
from helpers import printed_block
from test_seq import _reference_block
from utils.checkpoint import read_checkpoint, resnet_state
from utils.data import get_dataset


def _last_named(folder):
    return sorted(glob.glob(os.path.join(str(folder), "ckpt_E_*.t7")),
                  key=lambda p: int(os.path.basename(p).split("_")[2]))[-1]


def _fails(capsys, main, argv, *needles):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = str(exit_info.value.code) + "\n" + capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture
def seq_cl(tiny_data, tiny_args, tmp_path):
    """A 2-epoch BlockDrop-seq curriculum run (every block decided)."""
    cv = tmp_path / "seq_cl"
    cl_training.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "1",
                               "--test_every", "1", "--agent", "seq", "--cl_step", "15"))
    return cv


def test_seq_trains_saves_and_evaluates(seq_cl, tiny_data, tiny_args, tmp_path, capsys):
    spec = get_spec("R32_C10")
    cl = read_checkpoint(_last_named(seq_cl))
    assert cl["agent_type"] == "seq" and "resnet" not in cl
    torch.manual_seed(0)
    fresh = build_seq_agent(spec)
    assert set(cl["agent"]) == set(fresh.state_dict())
    ft_dir = tmp_path / "seq_ft"
    finetune.main(tiny_args(ft_dir, "--agent", "seq", "--pretrained", _last_named(seq_cl),
                            "--base_ckpt", tiny_data["base"], "--max_epochs", "1",
                            "--test_every", "1"))
    ft_path = _last_named(ft_dir)
    ft = read_checkpoint(ft_path)
    assert ft["agent_type"] == "seq" and {"agent", "resnet"} <= set(ft)
    assert any(not torch.equal(ft["agent"][k], cl["agent"][k]) for k in cl["agent"])
    # test.py --load needs no flag; it prints what the loaded networks do image by image
    rnet = build_resnet(spec)
    rnet.load_state_dict(ft["resnet"])
    agent = build_seq_agent(spec)
    agent.load_state_dict(ft["agent"])
    testset = get_dataset(spec, tiny_data["data_dir"], train=False)
    expected = _reference_block(rnet.eval(), agent.eval(), testset, "R32_C10")
    capsys.readouterr()
    test_script.main(["--model", "R32_C10", "--load", ft_path, "--data_dir",
                      tiny_data["data_dir"], "--workers", "0"])
    assert printed_block(capsys.readouterr().out) == expected + "\n"


def test_agent_type_mismatches_are_one_line(seq_cl, tiny_data, tiny_args, tmp_path, capsys):
    seq_ckpt = _last_named(seq_cl)
    _fails(capsys, cl_training.main, tiny_args(tmp_path / "a", "--base_ckpt", tiny_data["base"],
                                               "--load", seq_ckpt),
           "holds a 'seq' agent, not 'blockdrop'")
    _fails(capsys, finetune.main, tiny_args(tmp_path / "b", "--base_ckpt", tiny_data["base"],
                                            "--pretrained", seq_ckpt),
           "holds a 'seq' agent, not 'blockdrop'")
    blockdrop = str(tmp_path / "bd.t7")
    from models import build_policy
    torch.save({"agent": build_policy(get_spec("R32_C10")).state_dict()}, blockdrop)
    _fails(capsys, finetune.main, tiny_args(tmp_path / "c", "--base_ckpt", tiny_data["base"],
                                            "--agent", "seq", "--pretrained", blockdrop),
           "holds a 'blockdrop' agent, not 'seq'")
    _fails(capsys, cl_training.main, tiny_args(tmp_path / "d", "--agent", "lstm"),
           "invalid choice", "blockdrop", "seq")


def test_fixed_policy_finetuning_trains_only_the_kept_resnet(tiny_data, tiny_args, tmp_path,
                                                             capsys):
    cv = tmp_path / "ft_firstk"
    finetune.main(tiny_args(cv, "--policy", "firstk", "--k", "7", "--base_ckpt",
                            tiny_data["base"], "--max_epochs", "1", "--test_every", "1"))
    path = _last_named(cv)
    ckpt = read_checkpoint(path)
    assert "agent" not in ckpt and ckpt["fixed_policy"] == {"name": "firstk", "k": 7, "seed": 0}
    base = resnet_state(read_checkpoint(tiny_data["base"]))
    changed = {k for k, v in ckpt["resnet"].items()
               if v.is_floating_point() and not torch.equal(v, base[k])}
    rnet = build_resnet(get_spec("R32_C10"))
    dropped = {f"blocks.{s}.{b}." for t, (s, b) in enumerate(rnet.block_index) if t >= 7}
    kept = {f"blocks.{s}.{b}." for t, (s, b) in enumerate(rnet.block_index) if t < 7}
    assert not any(k.startswith(tuple(dropped)) for k in changed), "dropped blocks never run"
    assert all(any(k.startswith(p) for k in changed) for p in kept)
    assert {"conv1.weight", "fc.weight"} <= changed
    capsys.readouterr()
    argv = ["--model", "R32_C10", "--load", path, "--data_dir", tiny_data["data_dir"],
            "--workers", "0"]
    test_script.main(argv)  # the recorded policy
    recorded = capsys.readouterr().out
    test_script.main(argv + ["--policy", "firstk", "--k", "7"])
    assert capsys.readouterr().out == recorded
    assert "Block Usage: 7.000 \u00B1 0.000" in recorded and "Unique Policies: 1\n" in recorded


def test_fixed_policy_bad_input(tiny_data, tiny_args, tmp_path, capsys):
    base = ["--base_ckpt", tiny_data["base"]]
    for k in ("0", "16"):
        _fails(capsys, finetune.main,
               tiny_args(tmp_path / f"k{k}", *base, "--policy", "firstk", "--k", k),
               "between 1 and 15")
    _fails(capsys, finetune.main, tiny_args(tmp_path / "nok", *base, "--policy", "randomk"),
           "--policy randomk needs --k", "1 and 15")
    _fails(capsys, finetune.main, tiny_args(tmp_path / "bad", *base, "--policy", "lastk"),
           "invalid choice", "firstk", "distributek")
    _fails(capsys, finetune.main,
           tiny_args(tmp_path / "seq", *base, "--policy", "firstk", "--k", "3", "--agent", "seq"),
           "--policy firstk trains no agent")
