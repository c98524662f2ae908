"""test.py --policy (Table 1's baselines) and --out JSON."""
import json
import math

import numpy as np
import pytest
import torch

import test as test_script
from helpers import make_cifar, pk_layout, printed_block, randomize_bn
from legacy_writer import legacy_state_dict, save_pytorch03
from models import get_model, get_spec
from test_eval import _count_flops, _images, _trained_looking
from utils.data import get_dataset
from models.flops import flop_table

JSON_KEYS = {"model", "policy", "k", "checkpoint", "base_ckpt", "data_dir", "num_images",
             "accuracy", "block_usage_mean", "block_usage_std", "flops_mean", "flops_std",
             "unique_policies", "full_flops", "batch_size", "device"}


@torch.no_grad()
def _fixed_reference(rnet, vector, dataset):
    """A hand-written loop: forward_single with ``vector`` on one image at a time."""
    matches, ops = [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        preds, flops = _count_flops(rnet, rnet.forward_single, x.unsqueeze(0), vector)
        matches.append(float(preds.argmax(1).item() == y))
        ops.append(flops)
    usage = int(vector.sum())
    block = ("\n    Accuracy: %.3f\n    Block Usage: %.3f \u00B1 %.3f\n"
             "    FLOPs/img: %.2E \u00B1 %.2E\n    Unique Policies: %d\n    "
             % (np.float32(np.mean(matches)), usage, 0.0, np.mean(ops), np.std(ops), 1))
    return block, np.mean(matches), ops


def _main(capsys, argv):
    test_script.main(argv)
    return printed_block(capsys.readouterr().out)


@pytest.fixture
def setting(tmp_path):
    spec = get_spec("R32_C10")
    data = make_cifar(tmp_path / "data", n=30, seed=7)
    testset = get_dataset(spec, data, train=False)
    rnet, agent = _trained_looking("R32_C10", 2, _images(testset))
    base = str(tmp_path / "base.t7")
    save_pytorch03({"state_dict": pk_layout(rnet)}, base)
    cl = str(tmp_path / "cl.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "epoch": 5300}, cl)
    return dict(spec=spec, data=data, testset=testset, rnet=rnet, agent=agent, base=base, cl=cl,
                tmp=tmp_path, args=["--model", "R32_C10", "--data_dir", data, "--workers", "0"])


def test_firstk_prints_what_a_forward_single_loop_prints_and_writes_json(setting, capsys):
    vector = torch.tensor([1.0] * 7 + [0.0] * 8)
    expected, accuracy, ops = _fixed_reference(setting["rnet"], vector, setting["testset"])
    out_file = setting["tmp"] / "firstk.json"
    for batch in ("1", "7"):
        argv = setting["args"] + ["--policy", "firstk", "--k", "7", "--base_ckpt",
                                  setting["base"], "--batch_size", batch]
        if batch == "7":
            argv += ["--out", str(out_file)]
        assert _main(capsys, argv) == expected + "\n"
    stats = json.loads(out_file.read_text())
    assert set(stats) == JSON_KEYS
    table = flop_table("R32_C10")
    assert stats["flops_mean"] == ops[0] == table.resnet_fixed + sum(table.block_costs[:7])
    assert stats == {
        "model": "R32_C10", "policy": "firstk", "k": 7, "checkpoint": None,
        "base_ckpt": setting["base"], "data_dir": setting["data"], "num_images": 30,
        "accuracy": pytest.approx(accuracy), "block_usage_mean": 7.0, "block_usage_std": 0.0,
        "flops_mean": ops[0], "flops_std": 0.0, "unique_policies": 1,
        "full_flops": 137725184, "batch_size": 7, "device": "cpu"}
    assert stats["flops_mean"] < stats["full_flops"]


def test_every_fixed_policy_and_k_auto(setting, capsys):
    with torch.no_grad():
        usage = (setting["agent"](_images(setting["testset"]))[0] >= 0.5).sum(1).float()
    k = math.ceil(float(usage.mean()))
    assert k < 15
    for policy in ("firstk", "randomk", "distributek"):
        out_file = setting["tmp"] / f"{policy}.json"
        out = _main(capsys, setting["args"] + ["--policy", policy, "--k", "auto", "--load",
                                               setting["cl"], "--base_ckpt", setting["base"],
                                               "--out", str(out_file)])
        assert f"Block Usage: {k}.000 \u00B1 0.000" in out and "Unique Policies: 1\n" in out
        stats = json.loads(out_file.read_text())
        assert (stats["policy"], stats["k"], stats["checkpoint"]) == (policy, k, setting["cl"])
    # the BlockDrop checkpoint itself, written to JSON as well
    out_file = setting["tmp"] / "blockdrop.json"
    _main(capsys, setting["args"] + ["--load", setting["cl"], "--base_ckpt", setting["base"],
                                     "--out", str(out_file)])
    stats = json.loads(out_file.read_text())
    assert stats["policy"] == "blockdrop" and stats["k"] is None
    assert stats["block_usage_mean"] == pytest.approx(float(usage.mean()))
    assert stats["flops_mean"] > stats["full_flops"] * stats["block_usage_mean"] / 15


def test_fixed_policy_uses_the_resnet_of_load(setting, capsys):
    rnet2, _ = get_model("R32_C10")
    randomize_bn(rnet2, 9)
    rnet2.eval()
    both = str(setting["tmp"] / "ft.t7")
    save_pytorch03({"agent": legacy_state_dict(setting["agent"]),
                    "resnet": legacy_state_dict(rnet2)}, both)
    vector = torch.zeros(15)
    vector[[0, 1, 3, 5, 7, 10, 12]] = 1
    expected = _fixed_reference(rnet2, vector, setting["testset"])[0]
    assert _main(capsys, setting["args"] + ["--policy", "distributek", "--k", "7",
                                            "--load", both]) == expected + "\n"


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(argv)
    assert exit_info.value.code not in (0, None)
    err = str(exit_info.value.code) + "\n" + capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "test.py: error:" in ln]
    assert len(line) == 1, err  # one line says what was expected (after argparse's usage)
    for needle in needles:
        assert needle in line[0], err


def test_bad_policy_input(setting, capsys, monkeypatch):
    args, base, cl = setting["args"], setting["base"], setting["cl"]
    for k in ("0", "16", "-3"):
        _fails(capsys, args + ["--policy", "firstk", "--k", k, "--base_ckpt", base],
               "between 1 and 15")
    _fails(capsys, args + ["--policy", "firstk", "--k", "seven"], "--k", "'auto'")
    _fails(capsys, args + ["--policy", "randomk", "--k", "auto", "--base_ckpt", base],
           "--k auto needs a BlockDrop checkpoint", "between 1 and 15")
    _fails(capsys, args + ["--policy", "firstk", "--base_ckpt", base], "needs --k", "1 and 15")
    _fails(capsys, args + ["--policy", "lastk", "--k", "3"], "invalid choice", "firstk",
           "distributek", "seq")
    _fails(capsys, args + ["--pol", "firstk", "--k", "3"], "unrecognized arguments: --pol")
    _fails(capsys, args + ["--k", "3", "--load", cl, "--base_ckpt", base], "--k applies")
    _fails(capsys, args + ["--policy", "seq", "--load", cl, "--base_ckpt", base],
           "holds a 'blockdrop' agent, not 'seq'")
    _fails(capsys, args + ["--policy", "seq"], "--policy seq needs --load")
    monkeypatch.chdir(setting["tmp"])  # no cv/pretrained/ here: the current clear error
    _fails(capsys, args + ["--policy", "firstk", "--k", "3", "--load", cl],
           "base ResNet checkpoint not found", "holds only a policy", "--base_ckpt")
    taken = setting["tmp"] / "taken.json"
    taken.write_text("{}")
    _fails(capsys, args + ["--policy", "firstk", "--k", "3", "--base_ckpt", base,
                           "--out", str(taken)], "taken.json exists")
    assert taken.read_text() == "{}"
