"""SkipNet's feed-forward gates (``--agent skipnet_ff``, the peer's FFGate-II): the gate's
FLOPs, what it reads, real skipping, its training steps and checkpoints, shared flags."""

import pytest
import torch
import torch.nn.functional as F

import finetune
import test as test_script
from helpers import error_line, finetuned_once, printed_block, randomize_bn
from models import build_resnet, get_spec
from models.flops import flop_counter
from policies.registry import get_method, method_of
from policies.skipnet import (FeedforwardGates, SkipNetPair, SkipSource, build_ff_gates,
                              hrl_train_step, skip_pass, sp_train_step)
from policies.source import PolicySourceError
from test_skipnet import _reference_block
from utils.data import get_dataset

METHOD = get_method("skipnet_ff")


def _models(seed=0, keep=0.5, images=16):
    torch.manual_seed(seed)
    spec = get_spec("R32_C10")
    rnet = randomize_bn(build_resnet(spec), seed).eval()
    agent = randomize_bn(build_ff_gates(spec), seed + 1).eval()
    g = torch.Generator().manual_seed(seed)
    METHOD.calibrate(agent, rnet, torch.rand(images, 3, 32, 32, generator=g), keep, g)
    return rnet, agent


def test_gate_flops_by_hand_and_by_the_counter():
    # R32: gated blocks 1-5 read 16 channels at 32x32 (block 5 downsamples itself), 6-10
    # read 32 at 16x16, 11-14 read 64 at 8x8; the gate's stride-2 conv halves the size
    agent = build_ff_gates(get_spec("R32_C10"))
    assert agent.in_channels == (16,) * 6 + (32,) * 5 + (64,) * 4
    assert agent.in_sizes == (32,) * 6 + (16,) * 5 + (8,) * 4
    by_hand = (5 * (2 * 9 * 16 * 16 * 16 * 16 + 2 * 16) + 5 * (2 * 9 * 32 * 32 * 8 * 8 + 2 * 32)
               + 4 * (2 * 9 * 64 * 64 * 4 * 4 + 2 * 64))
    assert agent.flops == by_hand
    rnet = build_resnet(get_spec("R32_C10")).eval()
    with flop_counter(agent) as costs, torch.no_grad():
        skip_pass(rnet, agent.eval(), torch.rand(1, 3, 32, 32))
    assert sum(costs.values()) == by_hand
    assert METHOD.source(get_spec("R32_C10"), agent).policy_flops == by_hand


def test_each_gate_reads_its_blocks_input_through_a_stride_two_conv():
    rnet, agent = _models(seed=1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = skip_pass(rnet, agent, x, mode="grouped")
        h = rnet.stem(x)
        for t in range(rnet.num_blocks):
            if t > 0:
                bn = agent.bns[t - 1]
                y = F.relu(F.batch_norm(F.conv2d(h, agent.convs[t - 1].weight, stride=2,
                                                 padding=1), bn.running_mean, bn.running_var,
                                        bn.weight, bn.bias, eps=bn.eps))
                assert y.shape[-1] == (h.shape[-1] + 1) // 2
                logit = y.mean((2, 3)) @ agent.proj[t - 1].weight.t() + agent.proj[t - 1].bias
                assert torch.equal((logit.view(-1) > 0).float(), out.policy[:, t]), t
            residual = rnet.residual(t, h)
            m = out.policy[:, t].view(-1, 1, 1, 1)
            h = F.relu(residual + rnet.block(t)(h)) * m + residual * (1 - m)
    assert torch.allclose(out.logits, rnet.head(h), rtol=1e-4, atol=1e-4)


def test_dynamic_equals_masked_at_batch_one_and_more():
    rnet, agent = _models(seed=2)
    x = torch.rand(6, 3, 32, 32)
    source = SkipSource(agent)
    with torch.no_grad():
        logits, policy = source.run(rnet, x)
        masked, masked_policy = source.run(rnet, x, dynamic=False)
        single = [source.run(rnet, x[i:i + 1]) for i in range(len(x))]
    assert torch.equal(policy, masked_policy)
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=1e-4)
    for i, (one_logits, one_policy) in enumerate(single):
        assert torch.equal(one_policy, policy[i:i + 1])
        torch.testing.assert_close(one_logits, masked[i:i + 1], rtol=1e-4, atol=1e-4)
    assert 0 < float(policy[:, 1:].mean()) < 1 and len(torch.unique(policy, dim=0)) > 1


def test_training_steps_reach_every_gate_parameter():
    torch.manual_seed(3)
    spec = get_spec("R32_C10")
    net = SkipNetPair(randomize_bn(build_resnet(spec), 3), build_ff_gates(spec)).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    sp_train_step(net, x, y).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.agent.parameters())
    net.zero_grad()
    noise = torch.rand(8, 15)
    hrl_train_step(net, x, y, noise, alpha=0.1, rl_weight=0.01, gamma=1.0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.agent.parameters())


def test_fresh_sp_keeps_the_random_gates_and_fresh_hrl_starts_keeping():
    spec = get_spec("R32_C10")
    for phase, keeps in (("sp", False), ("hrl", True)):
        torch.manual_seed(0)
        agent = build_ff_gates(spec)
        before = [p.bias.clone() for p in agent.proj]
        METHOD.initialise(agent, spec, finetune.build_parser().parse_args(
            ["--agent", "skipnet_ff", "--skip_phase", phase]), "finetune")
        moved = not all(torch.equal(b, p.bias) for b, p in zip(before, agent.proj, strict=True))
        assert moved is keeps, phase


def test_finetune_trains_and_test_py_evaluates_the_checkpoint(tiny_data, tiny_args, tmp_path,
                                                              capsys):
    path, ckpt = finetuned_once(tiny_args, tiny_data, tmp_path / "ff", "--agent", "skipnet_ff",
                                "--skip_phase", "sp", "--skip_alpha", "0.2")
    assert ckpt["agent_type"] == "skipnet_ff" and method_of(ckpt) is METHOD
    spec = get_spec("R32_C10")
    rnet, agent = build_resnet(spec), build_ff_gates(spec)
    rnet.load_state_dict(ckpt["resnet"])
    agent.load_state_dict(ckpt["agent"])
    expected = _reference_block(rnet.eval(), agent.eval(),
                                get_dataset(spec, tiny_data["data_dir"], train=False))
    capsys.readouterr()
    for extra in ([], ["--batch_size", "1"]):
        test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--load",
                          path, "--workers", "0", "--device", "cpu", *extra])
        assert printed_block(capsys.readouterr().out).strip() == expected.strip()
    # loaded as the recurrent gates: one line naming both methods
    line = error_line(finetune.main, tiny_args(tmp_path / "as_rnn", "--agent", "skipnet",
                                               "--load", path, "--max_epochs", "0"), capsys)
    assert "skipnet_ff" in line and "skipnet" in line


def test_shares_skipnets_flags_and_checks():
    from utils.config import method_problems
    parser = finetune.build_parser()
    ff = ["--agent", "skipnet_ff", "--skip_alpha"]
    assert method_problems(parser.parse_args([*ff, "0.3"])) == []
    problems = method_problems(parser.parse_args([*ff, "-1"]))
    assert problems == ["--skip_alpha must be a finite number >= 0, got -1.0"]
    problems = method_problems(parser.parse_args(["--agent", "convnet_aig", "--skip_alpha", "1"]))
    assert any("--skip_alpha belongs to the skipnet method" in p for p in problems)
    with pytest.raises(PolicySourceError, match="needs SkipNet feed-forward gates"):
        METHOD.source(get_spec("R32_C10"), get_method("skipnet").build(get_spec("R32_C10")))
    assert isinstance(METHOD.build(get_spec("R110_C10")), FeedforwardGates)
