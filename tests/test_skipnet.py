"""SkipNet (ECCV 2018): the gates' equations, real skipping, training steps, checkpoints."""
import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cl_training
import finetune
import test as test_script
from helpers import error_line, printed_block, randomize_bn, reference_block
from models import build_resnet, get_spec
from models.flops import flop_counter, flop_table
from policies.registry import get_method, method_of
from policies.skipnet import (SkipGates, SkipNetPair, SkipSource, build_skip_gates,
                              discounted_returns, gate_log_prob, hrl_loss, hrl_train_step,
                              lstm_cell, skip_pass, skip_rewards, sp_train_step)
from policies.source import PolicySourceError
from utils.checkpoint import read_checkpoint
from utils.data import get_dataset


def _models(name="R32_C10", seed=0, keep=0.5, images=16):
    """An eval-mode ResNet with realistic BatchNorm and calibrated gates whose decisions
    vary between images."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    rnet = randomize_bn(build_resnet(spec), seed).eval()
    agent = build_skip_gates(spec)
    g = torch.Generator().manual_seed(seed)
    get_method("skipnet").calibrate(agent, rnet, torch.rand(images, 3, 32, 32, generator=g),
                                    keep, g)
    return rnet, agent


def _fresh(seed):
    """A train-mode pair of a ResNet and freshly built (unsaturated) gates."""
    torch.manual_seed(seed)
    spec = get_spec("R32_C10")
    return SkipNetPair(randomize_bn(build_resnet(spec), seed), build_skip_gates(spec)).train()


class ForcedGates(SkipGates):
    """Gates whose block ``always`` is kept by every row and block ``never`` by none."""

    always, never = 3, 5

    def step(self, t, h, state):
        logit, state = super().step(t, h, state)
        if t in (self.always, self.never):
            logit = torch.full_like(logit, 30.0 if t == self.always else -30.0)
        return logit, state


# -- the equations, by hand ---------------------------------------------------------
def test_lstm_cell_by_hand():
    gates = torch.tensor([[0.0, math.log(3.0), 0.5, -1.0]])  # i, f, g, o with H = 1
    c = torch.tensor([[2.0]])
    z, c_new = lstm_cell(gates, c)
    expected_c = 0.75 * 2.0 + 0.5 * math.tanh(0.5)
    assert c_new.item() == pytest.approx(expected_c, rel=1e-6)
    assert z.item() == pytest.approx(1 / (1 + math.e) * math.tanh(expected_c), rel=1e-6)


def test_rewards_returns_and_loss_by_hand():
    gated = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    rewards = skip_rewards(gated, alpha=0.3)  # alpha / N = 0.1 per skipped block
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.1, 0.1], [0.1, 0.0, 0.0]]))
    ret = discounted_returns(rewards, torch.tensor([-2.0, -1.0]), gamma=0.5)
    # G_2 = 0.1 + 0.5*(-2) = -0.9; G_1 = 0.1 + 0.5*G_2; G_0 = 0 + 0.5*G_1
    assert torch.allclose(ret[0], torch.tensor([-0.175, -0.35, -0.9]))
    assert torch.allclose(ret[1], torch.tensor([-0.025, -0.25, -0.5]))
    undiscounted = discounted_returns(rewards, torch.tensor([-2.0, -1.0]), gamma=1.0)
    assert torch.allclose(undiscounted[:, 0], torch.tensor([-1.8, -0.9]))
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5, 0.75
    acts = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(gate_log_prob(logits, acts), torch.log(torch.tensor([[0.5, 0.25]])))
    loss = hrl_loss(logits, acts, torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), 0.1)
    assert loss.item() == pytest.approx(0.5 + 0.1 * (math.log(2) + 2 * math.log(4)), rel=1e-6)


def test_gate_flops_by_hand_and_by_the_counter():
    # R32: inputs of blocks 1..14 have 16 (x5), 32 (x5), 64 (x4) channels
    embed = 2 * 10 * (16 * 5 + 32 * 5 + 64 * 4)
    lstm_and_proj = 14 * (2 * 10 * 40 + 2 * 10 * 40 + 2 * 10 * 1)
    agent = build_skip_gates(get_spec("R32_C10"))
    assert agent.flops == embed + lstm_and_proj == 32600
    rnet = build_resnet(get_spec("R32_C10")).eval()
    with flop_counter(agent) as costs, torch.no_grad():
        skip_pass(rnet, agent, torch.rand(1, 3, 32, 32))
    assert sum(costs.values()) == agent.flops
    assert get_method("skipnet").source(get_spec("R32_C10"), agent).policy_flops == 32600


def test_gates_read_the_pooled_output_of_the_block_before():
    rnet, agent = _models(seed=1)
    x = torch.rand(4, 3, 32, 32)
    seen = {}
    hooks = [e.register_forward_pre_hook(lambda m, i, t=t: seen.__setitem__(t, i[0].clone()))
             for t, e in enumerate(agent.embed, start=1)]
    with torch.no_grad():
        out = skip_pass(rnet, agent, x, mode="grouped")
        for hook in hooks:
            hook.remove()
        h = rnet.stem(x)
        state = agent.initial_state(h)
        for t in range(rnet.num_blocks):
            if t > 0:
                assert torch.allclose(seen[t], h.mean((2, 3)), rtol=1e-4, atol=1e-5), t
                logit, state = agent.step(t, h, state)
                assert torch.equal((torch.sigmoid(logit) > 0.5).float(), out.policy[:, t])
            residual = rnet.residual(t, h)
            m = out.policy[:, t].view(-1, 1, 1, 1)
            h = F.relu(residual + rnet.block(t)(h)) * m + residual * (1 - m)
    assert bool((out.policy[:, 0] == 1).all()), "block 0 always runs"
    assert torch.allclose(out.logits, rnet.head(h), rtol=1e-4, atol=1e-4)


# -- real skipping: dynamic == masked ----------------------------------------------
def _count_calls(rnet):
    rows = {}
    hooks = [rnet.block(t).register_forward_hook(
        lambda m, i, o, t=t: rows.__setitem__(t, rows.get(t, 0) + i[0].shape[0]))
        for t in range(rnet.num_blocks)]
    return rows, hooks


@pytest.mark.parametrize("name", ["R32_C10", pytest.param("R110_C10", marks=pytest.mark.slow)])
def test_dynamic_equals_masked_at_batch_one_and_more(name):
    rnet, agent = _models(name, seed=2)
    forced = ForcedGates(agent.in_channels)
    forced.load_state_dict(agent.state_dict())
    x = torch.rand(6, 3, 32, 32)
    for gates in (agent, forced):
        source = SkipSource(gates)
        rows, hooks = _count_calls(rnet)
        with torch.no_grad():
            logits, policy = source.run(rnet, x)
            for hook in hooks:
                hook.remove()
            masked, masked_policy = source.run(rnet, x, dynamic=False)
            single = [source.run(rnet, x[i:i + 1]) for i in range(len(x))]
        assert torch.equal(policy, masked_policy)
        assert torch.allclose(logits, masked, rtol=1e-4, atol=1e-4)
        # each block ran on exactly the rows that keep it (none: not at all)
        kept = policy.sum(0).long().tolist()
        assert {t: n for t, n in enumerate(kept) if n} == rows
        for i, (one_logits, one_policy) in enumerate(single):
            assert torch.equal(one_policy, policy[i:i + 1])
            assert torch.allclose(one_logits, masked[i:i + 1], rtol=1e-4, atol=1e-4)
        assert len(torch.unique(policy, dim=0)) > 1, "decisions differ between images"
    assert bool((policy[:, ForcedGates.always] == 1).all())
    assert bool((policy[:, ForcedGates.never] == 0).all())


def test_batch_one_does_not_compute_dropped_blocks():
    rnet, agent = _models(seed=3)
    calls = []
    hooks = [rnet.block(t).register_forward_hook(lambda m, i, o, t=t: calls.append(t))
             for t in range(rnet.num_blocks)]
    with torch.no_grad():
        _, policy = SkipSource(agent).run(rnet, torch.rand(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert calls == policy[0].nonzero().view(-1).tolist() and len(calls) < rnet.num_blocks


def test_threshold_moves_the_keep_rule_and_is_range_checked():
    rnet, agent = _models(seed=4)
    spec = get_spec("R32_C10")
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        usage = [get_method("skipnet").source(spec, agent, threshold=t).run(rnet, x)[1].sum()
                 for t in (0.0, 0.5, 1.0)]
    assert usage[0] == 8 * 15 and usage[2] == 8 and usage[0] > usage[1] > usage[2]
    with pytest.raises(PolicySourceError, match=r"must lie in \[0, 1\], got 1.5"):
        get_method("skipnet").source(spec, agent, threshold=1.5)
    with pytest.raises(PolicySourceError, match="needs SkipNet gates"):
        get_method("skipnet").source(spec, None)


def test_calibration_keeps_about_the_fraction_asked():
    rnet, agent = _models(seed=5, keep=0.6, images=32)
    with torch.no_grad():
        _, policy = SkipSource(agent).run(rnet, torch.rand(32, 3, 32, 32))
    assert 0.45 < float(policy.mean()) < 0.75
    assert len(torch.unique(policy, dim=0)) > 8


# -- training steps -----------------------------------------------------------------
def _changed(before, module):
    return {n: not torch.equal(before[n], p) for n, p in module.named_parameters()}


def test_hrl_step_moves_the_gates_and_the_blocks_that_ran():
    net = _fresh(6)
    agent = net.agent
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    noise = torch.rand(8, 15, generator=g)
    noise[:, 5] = 1.0  # block 5: never sampled
    noise[:, 3] = 0.0  # block 3: always sampled
    out = hrl_train_step(net, x, torch.randint(0, 10, (8,), generator=g), noise, alpha=0.1,
                         rl_weight=0.01, gamma=1.0)
    assert bool((out.policy[:, 5] == 0).all()) and bool((out.policy[:, 3] == 1).all())
    assert out.reward.shape == (8,)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    optimizer.zero_grad()
    out.loss.backward()
    assert agent.embed[0].weight.grad.abs().sum() > 0 and agent.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    changed = _changed(before, net)
    assert all(c for n, c in changed.items() if n.startswith("agent."))
    assert not any(c for n, c in changed.items() if n.startswith("rnet.blocks.1.0."))  # block 5
    assert all(c for n, c in changed.items() if n.startswith("rnet.blocks.0.3."))
    assert changed["rnet.fc.weight"] and changed["rnet.conv1.weight"]


def test_sp_step_carries_the_gradient_into_the_gates_straight_through():
    net = _fresh(7)
    agent = net.agent
    x = torch.rand(8, 3, 32, 32)
    out = sp_train_step(net, x, torch.randint(0, 10, (8,)))
    assert out.reward.shape == (8,) and set(out.policy.unique().tolist()) <= {0.0, 1.0}
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.parameters())


# -- through the scripts ------------------------------------------------------------
def _reference_block(rnet, agent, dataset):
    """One image at a time: the test rule, the chosen blocks, FLOPs from the table."""
    def one_image(x):
        out = skip_pass(rnet, agent, x, mode="grouped")
        return out.logits, out.policy
    return reference_block("R32_C10", dataset, one_image, lambda policy: agent.flops)


@pytest.mark.parametrize("phase", ["sp", "hrl"])
def test_finetune_trains_and_test_py_evaluates_the_checkpoint(phase, tiny_data, tiny_args,
                                                              tmp_path, capsys):
    cv = tmp_path / phase
    finetune.main(tiny_args(cv, "--agent", "skipnet", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "1", "--lr", "1e-2",
                            "--skip_phase", phase))
    path = sorted(glob.glob(os.path.join(cv, "ckpt_E_*.t7")))[-1]
    ckpt = read_checkpoint(path)
    assert ckpt["agent_type"] == "skipnet" and method_of(ckpt) is get_method("skipnet")
    spec = get_spec("R32_C10")
    rnet, agent = build_resnet(spec), build_skip_gates(spec)
    rnet.load_state_dict(ckpt["resnet"])
    agent.load_state_dict(ckpt["agent"])
    start = build_skip_gates(spec)
    get_method("skipnet").initialise(start, spec, None, "finetune")
    assert not torch.equal(agent.proj.bias, start.proj.bias), "the gates were trained"
    expected = _reference_block(rnet.eval(), agent, get_dataset(spec, tiny_data["data_dir"],
                                                                 train=False))
    capsys.readouterr()
    for extra in ([], ["--batch_size", "1"], ["--masked"]):
        test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--load",
                          path, "--workers", "0", "--device", "cpu", "--batch_size", "3",
                          *extra])
        assert printed_block(capsys.readouterr().out).strip() == expected.strip()


def test_bad_flags_give_one_line(tiny_data, tiny_args, tmp_path, capsys):
    base = ("--agent", "skipnet", "--base_ckpt", tiny_data["base"])
    cases = [(("--skip_alpha", "-1"), "--skip_alpha must be a finite number >= 0, got -1.0"),
             (("--skip_rl_weight", "0"), "--skip_rl_weight must be a finite number > 0"),
             (("--skip_gamma", "1.5"), "--skip_gamma must lie in [0, 1], got 1.5")]
    for i, (flags, message) in enumerate(cases):
        line = error_line(finetune.main, tiny_args(tmp_path / str(i), *base, *flags), capsys)
        assert message in line
    line = error_line(finetune.main, tiny_args(tmp_path / "b", "--skip_alpha", "0.5"), capsys)
    assert "--skip_alpha belongs to the skipnet method" in line
    line = error_line(cl_training.main, tiny_args(tmp_path / "c", *base), capsys)
    assert "skipnet" in line and "finetune" in line


@pytest.mark.parametrize("method,name,steps", [
    ("skipnet", "R32_C10", ["sp", "hrl"]), ("skipnet", "R110_C10", ["sp", "hrl"]),
    ("skipnet", "R101_ImgNet", ["hrl"]), ("skipnet_ff", "R32_C10", ["sp", "hrl"]),
    ("skipnet_ff", "R110_C10", ["sp", "hrl"])])
def test_configs_resolve_to_valid_skipnet_steps(method, name, steps):
    from scripts.repro.pipeline import method_configs
    from utils.config import resolve
    paths = method_configs(method, name)
    assert len(paths) == len(steps)
    runs = [resolve(finetune.build_parser(), ["--config", path]) for path in paths]
    assert [(a.model, a.agent, a.skip_phase) for a in runs] == [(name, method, s) for s in steps]
    hrl = runs[-1]
    assert hrl.skip_alpha == (0.01 if name == "R101_ImgNet" else 0.1)
    assert all(finetune.finetune_problems(a) == [] for a in runs)
    assert hrl.max_epochs + 1 == (40 if name == "R101_ImgNet" else 26)  # the peer's HRL


def test_test_py_without_a_checkpoint_runs_every_block_and_counts_the_gates(tiny_data, tmp_path,
                                                                           capsys):
    test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--base_ckpt",
                      tiny_data["base"], "--policy", "skipnet", "--workers", "0", "--device",
                      "cpu", "--out", str(tmp_path / "full.json")])
    capsys.readouterr()
    with open(tmp_path / "full.json") as f:
        stats = json.load(f)
    assert stats["policy"] == "skipnet" and stats["block_usage_mean"] == 15
    assert stats["flops_mean"] == flop_table("R32_C10").full_resnet + 32600
