"""ConvNet-AIG: its equations by hand, gates, execution paths, training step, checkpoints
through finetune.py and test.py, bad input."""
import glob
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
from models.flops import flop_table, module_flops
from policies.convnet_aig import (AIGAgent, AIGNet, AIGSource, aig_pass, aig_train_step,
                                  build_aig_agent, greedy_keep, gumbel_gate, logistic_noise,
                                  target_rate_loss)
from policies.registry import get_method, method_of
from policies.source import PolicySourceError
from utils.checkpoint import read_checkpoint
from utils.data import get_dataset

METHOD = get_method("convnet_aig")


def _models(name="R32_C10", seed=0, keep=0.6):
    """An eval-mode ResNet with realistic BatchNorm and calibrated gates whose decisions
    vary from image to image."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    rnet = randomize_bn(build_resnet(spec), seed).eval()
    agent = build_aig_agent(spec).eval()
    g = torch.Generator().manual_seed(seed)
    METHOD.calibrate(agent, rnet, torch.rand(48, 3, 32, 32, generator=g), keep, g)
    return rnet, agent


def _force(agent, t, keep):
    """Gate t keeps (or drops) its block for every image."""
    with torch.no_grad():
        agent.gates[t].fc2.weight.zero_()
        agent.gates[t].fc2.bias.copy_(torch.tensor([0.0, 1.0] if keep else [1.0, 0.0]))


# -- the equations by hand -------------------------------------------------------------
def test_target_rate_loss_by_hand():
    gates = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    # batch means 0.75 and 0.25; t = 0.6: ((0.15)^2 + (0.35)^2) / 2
    assert target_rate_loss(gates, 0.6).item() == pytest.approx(0.0725, abs=1e-7)
    assert target_rate_loss(torch.ones(3, 5), 1.0).item() == 0.0
    assert target_rate_loss(torch.zeros(2, 3), 0.5).item() == pytest.approx(0.25)


def test_gumbel_gate_by_hand():
    logits = torch.tensor([[0.1, 2.0], [0.1, 2.0], [1.0, -1.0]], requires_grad=True)
    u = torch.tensor([0.25, 0.05, 0.9])
    eps = torch.tensor([math.log(0.25 / 0.75), math.log(0.05 / 0.95), math.log(0.9 / 0.1)])
    assert torch.allclose(logistic_noise(u), eps, atol=1e-6)
    margin = torch.tensor([1.9, 1.9, -2.0]) + eps  # 0.801, -1.044, 0.197
    for tau in (1.0, 0.5):
        z, soft = gumbel_gate(logits, u, tau)
        assert z.tolist() == [1.0, 0.0, 1.0], "hard: keep iff logit_k - logit_d + logit(u) > 0"
        assert torch.allclose(soft, torch.sigmoid(margin / tau), atol=1e-6)
        # straight through: dz/dlogit_keep = s(1 - s)/tau = -dz/dlogit_drop
        grad, = torch.autograd.grad(z.sum(), logits)
        expect = soft.detach() * (1 - soft.detach()) / tau
        assert torch.allclose(grad[:, 1], expect, atol=1e-6)
        assert torch.allclose(grad[:, 0], -expect, atol=1e-6)
    # u at the ends stays finite
    assert torch.isfinite(logistic_noise(torch.tensor([0.0, 1.0]))).all()


def test_gumbel_samples_keep_with_the_softmax_probability():
    """Gumbel-max: the hard sample keeps with probability softmax(logits)[keep]."""
    logits = torch.tensor([[0.3, -0.5]]).expand(40000, 2)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    z, _ = gumbel_gate(logits, u)
    assert z.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(-0.8)).item(), abs=0.01)


def test_test_rule_and_threshold():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert greedy_keep(logits).tolist() == [1.0, 0.0, 0.0], "argmax; a tie drops"
    assert greedy_keep(logits, 0.5).tolist() == [1.0, 0.0, 1.0]
    assert greedy_keep(logits, 0.75).tolist() == [0.0, 0.0, 0.0]  # sigmoid(1) = 0.731
    assert greedy_keep(logits, 0.7).tolist() == [1.0, 0.0, 0.0]
    assert greedy_keep(logits, 0.0).tolist() == [1.0, 1.0, 1.0]


# -- gates ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,sum_c", [("R32_C10", 16 * 6 + 32 * 5 + 64 * 4),
                                        ("R110_C10", 16 * 19 + 32 * 18 + 64 * 17)])
def test_gate_flops_follow_the_convention(name, sum_c):
    spec = get_spec(name)
    agent = build_aig_agent(spec).eval()
    num_blocks = spec.num_blocks
    by_hand = 2 * 16 * sum_c + num_blocks * 2 * 16 * 2  # Linear(C, 16) and Linear(16, 2)
    rnet = build_resnet(spec).eval()
    counted = module_flops(lambda: aig_pass(rnet, agent, torch.zeros(1, 3, 32, 32)), agent)
    assert agent.flops == by_hand == sum(counted.values())
    assert METHOD.source(spec, agent).policy_flops == by_hand
    assert by_hand < flop_table(name).policy  # far cheaper than BlockDrop's policy net


def test_gate_layout_and_initialisation():
    agent = build_aig_agent(get_spec("R32_C10"))
    gate = agent.gates[0]
    assert (gate.fc1.in_features, gate.fc1.out_features) == (16, 16)
    assert isinstance(gate.fc1bn, torch.nn.BatchNorm1d) and gate.fc1bn.num_features == 16
    assert (gate.fc2.in_features, gate.fc2.out_features) == (16, 2)
    assert agent.gates[14].fc1.in_features == 64
    assert gate.fc2.bias.tolist() == pytest.approx([0.1, 2.0])
    assert gate.fc2.weight.abs().max() < 0.01


def test_gates_read_the_pooled_input_of_their_block():
    rnet, agent = _models(seed=1)
    x = torch.rand(5, 3, 32, 32)
    seen = {}
    hooks = [g.fc1.register_forward_pre_hook(
        lambda m, inp, t=t: seen.__setitem__(t, inp[0].clone())) for t, g in enumerate(agent.gates)]
    with torch.no_grad():
        out = aig_pass(rnet, agent, x, mode="grouped")
        for h in hooks:
            h.remove()
        policy = out.gates
        assert 0 < policy.sum() < policy.numel()
        h = rnet.stem(x)
        for t in range(rnet.num_blocks):
            assert torch.allclose(seen[t], h.mean((2, 3)), rtol=1e-4, atol=1e-5), t
            gate = agent.gates[t]
            logits = gate.fc2(F.relu(gate.fc1bn(gate.fc1(h.mean((2, 3))))))
            assert torch.equal(policy[:, t], (logits[:, 1] > logits[:, 0]).float()), t
            residual = rnet.residual(t, h)
            m = policy[:, t].view(-1, 1, 1, 1)
            h = F.relu(residual + rnet.block(t)(h)) * m + residual * (1 - m)


# -- execution: dynamic == masked ---------------------------------------------------------
@pytest.mark.parametrize("name", ["R32_C10", pytest.param("R110_C10", marks=pytest.mark.slow)])
def test_dynamic_equals_masked_at_batch_one_and_more(name):
    rnet, agent = _models(name, seed=2)
    _force(agent, 3, keep=False)  # a block no image keeps
    _force(agent, 7, keep=True)  # a block every image keeps
    source = METHOD.source(get_spec(name), agent)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dyn_logits, dyn_pol = source.run(rnet, x)
        msk_logits, msk_pol = source.run(rnet, x, dynamic=False)
        single = [source.run(rnet, x[i:i + 1]) for i in range(len(x))]
    assert torch.equal(dyn_pol, msk_pol)
    assert torch.equal(dyn_pol, torch.cat([p for _, p in single]))
    assert dyn_pol[:, 3].sum() == 0 and dyn_pol[:, 7].sum() == len(x)
    assert len(torch.unique(dyn_pol, dim=0)) > 1, "decisions differ between images"
    assert torch.allclose(dyn_logits, msk_logits, rtol=1e-4, atol=1e-4)
    for i in range(len(x)):
        chosen = rnet.forward_single(x[i:i + 1], dyn_pol[i])
        assert torch.allclose(single[i][0], chosen, rtol=1e-4, atol=1e-4)
        assert torch.allclose(msk_logits[i:i + 1], chosen, rtol=1e-4, atol=1e-4)
    # an inference copy (BatchNorm folded, channels_last) decides the same
    fast = source.for_inference()
    with torch.no_grad():
        assert torch.equal(fast.run(rnet, x)[1], dyn_pol)


def test_fixed_first_blocks_run_without_gates():
    rnet, agent = _models(seed=10, keep=0.3)
    agent.fixed_first.fill_(4)
    spec = get_spec("R32_C10")
    assert agent.flops == sum(g.flops for g in agent.gates[4:])
    assert METHOD.source(spec, agent).policy_flops == agent.flops
    called = []
    hooks = [g.register_forward_hook(lambda m, i, o, t=t: called.append(t))
             for t, g in enumerate(agent.gates)]
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        dyn_logits, policy = METHOD.source(spec, agent).run(rnet, x)
        msk_logits, msk_policy = METHOD.source(spec, agent).run(rnet, x, dynamic=False)
    for h in hooks:
        h.remove()
    assert min(called) == 4, "the fixed blocks' gates do not run"
    assert bool((policy[:, :4] == 1).all()) and policy[:, 4:].mean() < 0.6
    assert torch.equal(policy, msk_policy)
    assert torch.allclose(dyn_logits, msk_logits, rtol=1e-4, atol=1e-4)
    # the target-rate loss leaves the fixed blocks out
    net = AIGNet(rnet, agent).train()
    noise = torch.rand(5, 15, generator=torch.Generator().manual_seed(11))
    y = torch.arange(5)
    out = aig_train_step(net, x, y, noise, target=0.5, loss_weight=2.0)
    with torch.no_grad():
        again = net(x, noise)
    expect = F.cross_entropy(again.logits, y) + 2.0 * target_rate_loss(again.gates[:, 4:], 0.5)
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_batch_one_skips_dropped_blocks():
    rnet, agent = _models(seed=3)
    calls = []
    hooks = [rnet.block(t).register_forward_hook(lambda m, i, o, t=t: calls.append(t))
             for t in range(rnet.num_blocks)]
    with torch.no_grad():
        _, policy = AIGSource(agent).run(rnet, torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert calls == policy[0].nonzero().view(-1).tolist() and len(calls) < rnet.num_blocks


def test_threshold_moves_the_keep_rule():
    rnet, agent = _models(seed=4)
    x = torch.rand(8, 3, 32, 32)
    spec = get_spec("R32_C10")
    with torch.no_grad():
        usage = [METHOD.source(spec, agent, threshold=t).run(rnet, x)[1].sum().item()
                 for t in (0.0, 0.3, 0.7, 1.0)]
    assert usage[0] == 8 * 15 and usage[0] >= usage[1] >= usage[2] >= usage[3]
    assert usage[1] > usage[2]


def test_calibrate_keeps_about_the_fraction_asked():
    spec = get_spec("R32_C10")
    torch.manual_seed(5)
    rnet = randomize_bn(build_resnet(spec), 5).eval()
    agent = build_aig_agent(spec).eval()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(64, 3, 32, 32, generator=g)
    METHOD.calibrate(agent, rnet, images, 0.4, g)
    with torch.no_grad():
        _, policy = AIGSource(agent).run(rnet, images)
    assert policy.mean().item() == pytest.approx(0.4, abs=0.05)
    assert len(torch.unique(policy, dim=0)) > 10


# -- training ----------------------------------------------------------------------------
def test_one_step_moves_the_gates_and_the_kept_blocks_only():
    rnet, agent = _models(seed=6)
    _force(agent, 4, keep=False)  # no image runs block 4: its weights get no gradient
    net = AIGNet(rnet, agent).train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    noise = torch.rand(8, 15, generator=g)
    noise[:, 4] = 0.5  # logit(0.5) = 0: the forced gate decides as at test time
    out = aig_train_step(net, x, y, noise, target=0.5, loss_weight=2.0)
    assert out.policy[:, 4].sum() == 0 and set(out.policy.unique().tolist()) <= {0.0, 1.0}
    optimizer.zero_grad()
    out.loss.backward()
    assert all(g.fc2.weight.grad.abs().sum() > 0 for g in agent.gates), "gradient reaches gates"
    optimizer.step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    block4 = {n for n, _ in rnet.block(4).named_parameters(prefix="rnet.blocks.0.4")}
    assert block4 and block4 <= set(before)
    assert not moved & block4, "a block no image ran gets no update"
    # the forced gate's last layer has zero weights: no gradient reaches its first layers
    gate4 = {n for n, _ in agent.gates[4].named_parameters(prefix="agent.gates.4")}
    assert moved == set(before) - block4 - {n for n in gate4 if ".fc2." not in n}


def test_straight_through_gradient_of_the_last_gate_by_hand():
    """Only the target-rate loss: the last gate's z reaches nothing else, so the gradient
    of its fc2 bias is (2/L)(z̄ − t)/B · Σ_b s_b(1 − s_b)/τ · (−1, +1)."""
    rnet, agent = _models(seed=7)
    net = AIGNet(rnet, agent).train()
    g = torch.Generator().manual_seed(7)
    x, noise = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 15, generator=g)
    tau, t = 0.7, 0.4
    out = net(x, noise, tau)
    target_rate_loss(out.gates, t).backward()
    z, s = out.gates[:, -1].detach(), out.soft[:, -1].detach()
    dz = 2 / 15 * (z.mean() - t) / 6
    expect = dz * (s * (1 - s) / tau).sum()
    grad = agent.gates[-1].fc2.bias.grad
    assert grad.tolist() == pytest.approx([-expect.item(), expect.item()], abs=1e-7)
    assert expect.abs() > 1e-4


def test_a_training_batch_of_one_image_uses_the_running_statistics():
    rnet, agent = _models(seed=9)
    x, noise = torch.rand(1, 3, 32, 32), torch.rand(1, 15)
    with torch.no_grad():
        expect = aig_pass(rnet, agent, x, noise).gates  # eval mode
        agent.train()
        assert torch.equal(aig_pass(rnet, agent, x, noise).gates, expect)


def test_training_decisions_are_a_function_of_the_noise():
    rnet, agent = _models(seed=8)
    net = AIGNet(rnet, agent).train()
    g = torch.Generator().manual_seed(8)
    x, noise = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 15, generator=g)
    with torch.no_grad():
        a, b = net(x, noise), net(x, noise)
        c = net(x, torch.rand(6, 15, generator=g))
    assert torch.equal(a.gates, b.gates) and torch.equal(a.logits, b.logits)
    assert not torch.equal(a.gates, c.gates)


# -- through the scripts -----------------------------------------------------------------
def _last(folder):
    return sorted(glob.glob(os.path.join(str(folder), "ckpt_E_*.t7")),
                  key=lambda p: int(os.path.basename(p).split("_")[2]))[-1]


def _reference_block(rnet, agent, dataset, name):
    """One image at a time: the gates' argmax, the chosen blocks, FLOPs by the table."""
    def one_image(x):
        out = aig_pass(rnet, agent, x, mode="grouped")
        return out.logits, out.gates
    return reference_block(name, dataset, one_image, lambda policy: agent.flops)


def test_finetune_checkpoint_round_trips_through_test_py(tiny_data, tiny_args, tmp_path,
                                                         capsys):
    spec = get_spec("R32_C10")
    cv = tmp_path / "aig_ft"
    finetune.main(tiny_args(cv, "--agent", "convnet_aig", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "1", "--aig_target", "0.5"))
    path = _last(cv)
    ckpt = read_checkpoint(path)
    assert ckpt["agent_type"] == "convnet_aig" and method_of(ckpt) is METHOD
    assert set(ckpt["agent"]) == set(build_aig_agent(spec).state_dict())
    assert ckpt["agent"]["gates.14.fc2.bias"].tolist() != pytest.approx([0.1, 2.0], abs=1e-6)
    base = read_checkpoint(tiny_data["base"])["state_dict"]
    assert any(not torch.equal(ckpt["resnet"][k], base[k]) for k in base)

    rnet, agent = build_resnet(spec), build_aig_agent(spec)
    rnet.load_state_dict(ckpt["resnet"])
    agent.load_state_dict(ckpt["agent"])
    rnet.eval(), agent.eval()
    # gates that vary between images, saved as a checkpoint of the method
    images = torch.stack([x for x, _ in get_dataset(spec, tiny_data["data_dir"], train=True)])
    METHOD.calibrate(agent, rnet, images, 0.5, torch.Generator().manual_seed(9))
    varied = str(tmp_path / "varied.t7")
    torch.save({**ckpt, "agent": agent.state_dict()}, varied)
    testset = get_dataset(spec, tiny_data["data_dir"], train=False)
    capsys.readouterr()
    for load, net in ((path, None), (varied, agent)):
        if net is None:
            trained = build_aig_agent(spec)
            trained.load_state_dict(ckpt["agent"])
            net = trained.eval()
        expected = _reference_block(rnet, net, testset, "R32_C10")
        for extra in ([], ["--batch_size", "1"], ["--masked"]):
            test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"],
                              "--load", load, "--batch_size", "3", "--workers", "0",
                              "--device", "cpu", *extra])
            assert printed_block(capsys.readouterr().out) == expected + "\n", (load, extra)
    assert "Unique Policies: 1\n" not in expected


def test_fixed_first_is_saved_and_its_gates_stay_frozen(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "aig_fixed"
    finetune.main(tiny_args(cv, "--agent", "convnet_aig", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "1", "--aig_fixed_first", "3"))
    agent = read_checkpoint(_last(cv))["agent"]
    assert int(agent["fixed_first"]) == 3
    assert torch.equal(agent["gates.2.fc2.bias"], torch.tensor([0.1, 2.0]))
    assert agent["gates.3.fc2.bias"].tolist() != pytest.approx([0.1, 2.0], abs=1e-6)


def test_bad_input_gives_one_line(tiny_data, tiny_args, tmp_path, capsys):
    def line(*extra, main=finetune.main):
        return error_line(main, tiny_args(tmp_path / "x", "--base_ckpt", tiny_data["base"],
                                          *extra), capsys)

    for flag, value, needle in (("--aig_target", "0", "--aig_target must lie in (0, 1]"),
                                ("--aig_target", "1.5", "--aig_target must lie in (0, 1]"),
                                ("--aig_target", "nan", "--aig_target must lie in (0, 1]"),
                                ("--aig_loss_weight", "-1", "--aig_loss_weight must be"),
                                ("--aig_temperature", "0", "--aig_temperature must be"),
                                ("--aig_fixed_first", "15",
                                 "--aig_fixed_first must lie in 0..14 for R32_C10, got 15"),
                                ("--aig_fixed_first", "-1", "--aig_fixed_first must lie in")):
        assert needle in line("--agent", "convnet_aig", flag, value), flag
    assert "--aig_target belongs to the convnet_aig method" in line("--aig_target", "0.5")
    assert "not trained by the 'cl' stage" in line("--agent", "convnet_aig",
                                                   main=cl_training.main)
    spec = get_spec("R32_C10")
    with pytest.raises(PolicySourceError, match=r"must lie in \[0, 1\], got 1.5"):
        METHOD.source(spec, build_aig_agent(spec), threshold=1.5)
    with pytest.raises(PolicySourceError, match="needs ConvNet-AIG gates"):
        METHOD.source(spec, None)
    with pytest.raises(PolicySourceError, match="decide 54 blocks"):
        METHOD.source(spec, AIGAgent([16] * 54))


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10", "R101_ImgNet"])
def test_configs_resolve_for_finetune(name):
    import yaml

    from utils.config import check_common, method_problems, resolve
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "convnet_aig", f"{name}.yaml")
    args = resolve(finetune.build_parser(), ["--config", path])
    with open(path) as f:
        data = yaml.safe_load(f)
    for key, value in data.items():
        assert getattr(args, key) == (pytest.approx(value) if isinstance(value, float) else value)
    assert args.model == name and args.agent == "convnet_aig"
    assert check_common(args) == [] and method_problems(args) == []
