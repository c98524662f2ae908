"""test.py prints what the authors' batch-size-1 loop printed (docs/evaluation.md)."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import test as test_script
from helpers import make_cifar, pk_layout, printed_block, randomize_bn
from legacy_writer import legacy_state_dict, save_pytorch03
from models import get_model, get_spec
from utils.data import get_dataset


def _trained_looking(name, seed, images):
    """A ResNet and a policy whose greedy policies vary from image to image: the
    logit layer is set to a random projection of the standardised features."""
    torch.manual_seed(seed)
    rnet, agent = get_model(name)
    randomize_bn(rnet, seed)
    randomize_bn(agent, seed + 1)
    agent.eval()
    with torch.no_grad():
        feats = agent.features.forward_full(images)
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        w = torch.randn(agent.num_blocks, feats.shape[1]) / sd / feats.shape[1] ** 0.5 * 3
        agent.logit.weight.copy_(w)
        agent.logit.bias.copy_(-w @ mu + 0.5 * torch.randn(agent.num_blocks))
    return rnet.eval(), agent


def _images(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _count_flops(module, fn, *args):
    """The authors' per-layer counting, done with hooks: conv 2*Cin*Cout*k*k*H*W,
    linear 2*in*out."""
    total = [0]

    def hook(m, _inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += 2 * m.in_channels * m.out_channels * int(np.prod(m.kernel_size)) \
                * out.shape[-1] * out.shape[-2]
        else:
            total[0] += 2 * m.in_features * m.out_features
    hooks = [m.register_forward_hook(hook) for m in module.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = fn(*args)
    for h in hooks:
        h.remove()
    return out, total[0]


@torch.no_grad()
def _reference_block(rnet, agent, dataset):
    """The authors' test(): one image at a time, forward_single, float32 statistics."""
    matches, policies, ops = [], [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        x = x.unsqueeze(0)
        (probs, _), agent_ops = _count_flops(agent, agent, x)
        policy = probs.clone()
        policy[policy < 0.5] = 0.0
        policy[policy >= 0.5] = 1.0
        preds, rnet_ops = _count_flops(rnet, rnet.forward_single, x, policy.squeeze(0))
        matches.append((preds.argmax(1) == y).float())
        policies.append(policy)
        ops.append(agent_ops + rnet_ops)
    policies = torch.cat(policies, 0)
    accuracy = torch.cat(matches, 0).mean().item()
    usage = policies.sum(1)
    unique = len({"".join(str(int(v)) for v in p) for p in policies})
    values = (accuracy, usage.mean().item(), usage.std().item(), np.mean(ops), np.std(ops), unique)
    return ("\n    Accuracy: %.3f\n    Block Usage: %.3f \u00B1 %.3f\n"
            "    FLOPs/img: %.2E \u00B1 %.2E\n    Unique Policies: %d\n    " % values)


def _run(capsys, argv):
    test_script.main(argv)
    return printed_block(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10", "R32_C100", "R110_C100"])
def test_prints_what_the_authors_batch1_loop_prints(tmp_path, capsys, name):
    spec = get_spec(name)
    data = make_cifar(tmp_path / "data", n=40, num_classes=spec.num_classes, seed=3)
    testset = get_dataset(spec, data, train=False)
    rnet, agent = _trained_looking(name, 5, _images(testset))
    ckpt = str(tmp_path / "ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet),
                    "epoch": 2000, "reward": 0.195, "acc": 0.936}, ckpt)
    expected = _reference_block(rnet, agent, testset)
    assert "Unique Policies: 1\n" not in expected  # the policies really vary
    for batch in ("1", "16"):
        out = _run(capsys, ["--model", name, "--load", ckpt, "--data_dir", data,
                            "--batch_size", batch, "--workers", "0"])
        assert out == expected + "\n"
    masked = _run(capsys, ["--model", name, "--load", ckpt, "--data_dir", data, "--masked",
                           "--workers", "0"])
    assert masked == expected + "\n"
    plain = _run(capsys, ["--model", name, "--load", ckpt, "--data_dir", data, "--no_fold",
                          "--no_channels_last", "--workers", "0"])  # the fast defaults off
    assert plain == expected + "\n"


def test_agent_only_checkpoint_uses_the_default_base_path(tmp_path, capsys, monkeypatch):
    data = make_cifar(tmp_path / "data", n=12)
    testset = get_dataset(get_spec("R32_C10"), data, train=False)
    rnet, agent = _trained_looking("R32_C10", 1, _images(testset))
    monkeypatch.chdir(tmp_path)
    base = get_spec("R32_C10").base_checkpoint
    os.makedirs(os.path.dirname(base))
    save_pytorch03({"state_dict": pk_layout(rnet)}, base)
    cl = str(tmp_path / "cl.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "epoch": 5300}, cl)
    expected = _reference_block(rnet, agent, testset)
    assert _run(capsys, ["--model", "R32_C10", "--load", cl, "--data_dir", "data",
                         "--workers", "0"]) == expected + "\n"
    # without --load: the base network with every block kept, the policy still counted
    out = _run(capsys, ["--model", "R32_C10", "--data_dir", "data", "--workers", "0"])
    assert "Block Usage: 15.000 \u00B1 0.000" in out and "Unique Policies: 1\n" in out
    assert "FLOPs/img: 1.62E+08 \u00B1 0.00E+00" in out  # 137,725,184 + 24,479,744


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(argv)
    assert exit_info.value.code not in (0, None)
    err = str(exit_info.value.code) + capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_input(tmp_path, capsys):
    data = make_cifar(tmp_path / "data", n=4)
    rnet, agent = get_model("R32_C10")
    r32 = str(tmp_path / "r32.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet)}, r32)
    _fails(capsys, ["--model", "R34_C10"], "unknown model", "R110_C10")
    _fails(capsys, ["--model", "R32_C10", "--load", r32, "--data_dir", str(tmp_path / "none")],
           "cifar-10-batches-py", "test_batch")
    _fails(capsys, ["--model", "R110_C10", "--load", r32, "--data_dir", data],
           r32, "missing keys: blocks.0.10")
    _fails(capsys, ["--model", "R32_C10", "--load", str(tmp_path / "nope.t7"), "--data_dir", data],
           "nope.t7", "not found")
    save_pytorch03({"agent": legacy_state_dict(agent)}, str(tmp_path / "cl.t7"))
    _fails(capsys, ["--model", "R32_C10", "--load", str(tmp_path / "cl.t7"), "--data_dir", data,
                    "--base_ckpt", str(tmp_path / "base.t7")], "base.t7", "--base_ckpt")
    _fails(capsys, ["--model", "R32_C10", "--batch_size", "0"], "--batch_size")
