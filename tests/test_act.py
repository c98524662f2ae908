"""ACT on ResNets (Figurnov et al. 2017, Sec. 2): halting weights, ponder cost, the
halting-weighted stage output, real skipping, training step, checkpoints, bad input."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cl_training
import finetune
import test as test_script
from helpers import error_line, finetuned_once, printed_block, randomize_bn, reference_block
from models import build_resnet, get_spec
from policies.act import (ActNet, ActSource, HaltingUnits, act_loss, act_pass, act_train_step,
                          build_halting_units, halting_distribution, halting_flops,
                          ponder_cost)
from policies.registry import build_source, get_method
from policies.source import PolicySourceError
from utils.data import get_dataset


# -- the equations on hand-computed values ----------------------------------------
def test_halting_weights_remainder_and_ponder_cost_of_a_three_block_stage():
    # two halting scores per image (blocks 1 and 2; block 3 has no unit), ε = 0.01
    h = torch.tensor([[0.3, 0.5],     # 0.3, 0.8: never reaches 0.99 -> N = 3
                      [0.6, 0.45],    # 0.6, 1.05 >= 0.99 -> N = 2
                      [0.995, 0.2],   # 0.995 -> N = 1
                      [0.49, 0.5]],   # 0.99 exactly -> N = 2
                     requires_grad=True)
    p, num, rem = halting_distribution(h, 1 - 0.01)
    assert num.tolist() == [3, 2, 1, 2]
    assert torch.allclose(rem, torch.tensor([0.2, 0.4, 1.0, 0.51]))
    assert torch.allclose(p, torch.tensor([[0.3, 0.5, 0.2],
                                           [0.6, 0.4, 0.0],
                                           [1.0, 0.0, 0.0],
                                           [0.49, 0.51, 0.0]]))
    assert torch.allclose(p.sum(1), torch.ones(4))
    rho = ponder_cost(num, rem)
    assert torch.allclose(rho, torch.tensor([3.2, 2.4, 2.0, 2.51]))
    # N carries no gradient; R = 1 - Σ_{i<N} h_i: dρ/dh_i = -1 for i < N, else 0
    rho.sum().backward()
    assert torch.equal(h.grad, torch.tensor([[-1.0, -1.0], [-1.0, 0.0], [0.0, 0.0],
                                             [-1.0, 0.0]]))


def test_a_moved_threshold_and_a_one_block_stage():
    h = torch.tensor([[0.3, 0.5]])
    p, num, rem = halting_distribution(h, 0.25)  # halts at the first block
    assert num.tolist() == [1] and torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0]]))
    p, num, rem = halting_distribution(torch.zeros(2, 0), 0.99)  # L = 1: no unit
    assert num.tolist() == [1, 1] and torch.equal(p, torch.ones(2, 1))
    assert torch.equal(ponder_cost(num, rem), torch.full((2,), 2.0))


def test_the_loss_is_cross_entropy_plus_tau_times_the_mean_ponder_cost():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    ce = (-np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(1 / (1 + np.e))) / 2
    loss = act_loss(logits, targets, torch.tensor([6.5, 9.5]), tau=0.01)
    assert abs(float(loss) - (ce + 0.01 * 8.0)) < 1e-6


# -- the forward pass ------------------------------------------------------------------
def _models(seed=0, keep=0.5, name="R32_C10"):
    """An eval-mode ResNet with realistic BatchNorm and halting units calibrated so that
    the stages stop at different blocks for different images."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    rnet = randomize_bn(build_resnet(spec), seed).eval()
    agent = build_halting_units(spec).eval()
    g = torch.Generator().manual_seed(seed)
    get_method("act").calibrate(agent, rnet, torch.rand(48, 3, 32, 32, generator=g), keep, g)
    return rnet, agent


@pytest.fixture(scope="module")
def models():
    return _models()


def test_halting_units_sit_after_every_block_but_the_last_of_each_stage():
    agent = build_halting_units(get_spec("R32_C10"))
    assert [len(stage) for stage in agent.units] == [4, 4, 4]
    assert [u.in_features for u in agent.all_units()] == [16] * 4 + [32] * 4 + [64] * 4
    assert all(float(u.bias.detach()) == -3.0 for u in agent.all_units())  # the peer's init
    assert agent.flops == 2 * 4 * (16 + 32 + 64)
    source = build_source("act", get_spec("R32_C10"), agent=agent)
    assert source.policy_flops == 896 and not source.one_shot
    r110 = build_halting_units(get_spec("R110_C10"))
    assert r110.flops == 2 * 17 * (16 + 32 + 64)
    # the exact count: executed blocks with a unit (not a stage's last)
    policy = torch.zeros(2, 15)
    policy[0, :5] = 1
    policy[1, [0, 5, 10, 11]] = 1
    assert halting_flops(agent, policy).tolist() == [4 * 32, 32 + 64 + 128 + 128]


def test_the_masked_pass_is_the_halting_weighted_sum_of_block_outputs(models):
    rnet, agent = models
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = act_pass(rnet, agent, x, mode="masked")
        h, t, rho = rnet.stem(x), 0, torch.zeros(4)
        for s, count in enumerate(rnet.layers):  # the rule written out, image by image
            outs, cum, done = [], torch.zeros(4), torch.zeros(4, dtype=torch.bool)
            weights = torch.zeros(4, count)
            for n in range(count):
                h = F.relu(rnet.residual(t + n, h) + rnet.block(t + n)(h))
                outs.append(h)
                score = torch.sigmoid(agent.units[s][n](h.mean((2, 3)))).view(-1) \
                    if n < count - 1 else torch.ones(4)
                for i in range(4):
                    if done[i]:
                        continue
                    if n == count - 1 or cum[i] + score[i] >= 0.99:
                        weights[i, n] = 1 - cum[i]
                        rho[i] += n + 1 + 1 - cum[i]
                        done[i] = True
                        assert out.policy[i, t:t + count].tolist() == [1.0] * (n + 1) + \
                            [0.0] * (count - n - 1)
                    else:
                        weights[i, n] = score[i]
                    cum[i] += score[i]
            h = sum(weights[:, n].view(-1, 1, 1, 1) * y for n, y in enumerate(outs))
            t += count
        logits = rnet.head(h)
    assert torch.allclose(out.logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.ponder, rho, atol=1e-5)
    assert 0 < out.policy.sum() < out.policy.numel()


@pytest.mark.parametrize("batch", [1, 6])
def test_dynamic_execution_equals_the_masked_reference(models, batch):
    rnet, agent = models
    source = ActSource(agent)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        logits, policy = source.run(rnet, x)
        ref_logits, ref_policy = source.run(rnet, x, dynamic=False)
        dyn, masked = act_pass(rnet, agent, x, mode="dynamic"), act_pass(rnet, agent, x)
    assert torch.equal(policy, ref_policy)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(dyn.ponder, masked.ponder, atol=1e-6)
    if batch > 1:
        assert len(torch.unique(policy, dim=0)) > 1, "stages halt at different blocks"


@pytest.mark.parametrize("bias", [10.0, -10.0])
def test_blocks_kept_by_no_image_and_by_every_image(bias):
    """Bias +10 on stage 1's first unit: every image halts after block 0, so blocks 1..4
    run for none; bias -10 on every unit: every image runs every block."""
    rnet, agent = _models(seed=1)
    with torch.no_grad():
        units = agent.units[0][:1] if bias > 0 else agent.all_units()
        for unit in units:
            unit.weight.zero_()
            unit.bias.fill_(bias)
    calls = []
    hooks = [rnet.block(t).register_forward_hook(lambda m, i, o, t=t: calls.append(t))
             for t in range(rnet.num_blocks)]
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        logits, policy = ActSource(agent).run(rnet, x)
        dyn_calls = list(calls)
        ref_logits, ref_policy = ActSource(agent).run(rnet, x, dynamic=False)
    for hk in hooks:
        hk.remove()
    assert torch.equal(policy, ref_policy)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    if bias > 0:
        assert policy[:, :5].tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]] * 5
        assert not set(dyn_calls) & {1, 2, 3, 4}
    else:
        assert bool((policy == 1).all()) and dyn_calls == list(range(15))


def test_batch_one_skips_the_blocks_after_halting(models):
    rnet, agent = models
    calls = []
    hooks = [rnet.block(t).register_forward_hook(lambda m, i, o, t=t: calls.append(t))
             for t in range(rnet.num_blocks)]
    with torch.no_grad():
        _, policy = ActSource(agent).run(rnet, torch.rand(1, 3, 32, 32))
    for hk in hooks:
        hk.remove()
    assert calls == policy[0].nonzero().view(-1).tolist() and len(calls) < rnet.num_blocks
    assert policy[0, [0, 5, 10]].tolist() == [1.0, 1.0, 1.0]  # a stage's first block runs


def test_a_lower_threshold_halts_earlier(models):
    rnet, agent = models
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        usage = [float(ActSource(agent, t).run(rnet, x)[1].sum(1).mean())
                 for t in (0.3, None, 1.0)]
    assert usage[0] < usage[1] <= usage[2]


def test_calibration_keeps_about_the_asked_fraction():
    rnet, agent = _models(seed=2, keep=0.6)
    with torch.no_grad():
        _, policy = ActSource(agent).run(rnet, torch.rand(48, 3, 32, 32))
    assert abs(float(policy.mean()) - 0.6) < 0.15
    assert len(torch.unique(policy, dim=0)) > 3


# -- training ------------------------------------------------------------------------
def test_one_training_step_moves_what_ran_and_nothing_else():
    """Stage 1 halts after its first block for every image: its other blocks and all its
    halting units (N = 1 gives p_1 = R = 1, no h) get no gradient; stages 2 and 3 run every
    block, and everything there moves."""
    torch.manual_seed(3)
    spec = get_spec("R32_C10")
    rnet, agent = randomize_bn(build_resnet(spec), 3), build_halting_units(spec)  # bias -3
    with torch.no_grad():
        agent.units[0][0].weight.zero_()
        agent.units[0][0].bias.fill_(10.0)
    net = ActNet(rnet, agent).train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = act_train_step(net, x, y, tau=0.01, penalty=-5.0)
    assert out.policy[:, :5].tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]] * 8
    optimizer.zero_grad()
    out.loss.backward()
    assert all(float(u.weight.grad.abs().sum()) > 0 for u in [*agent.units[1], *agent.units[2]])
    optimizer.step()
    frozen = {f"rnet.blocks.0.{b}." for b in (1, 2, 3, 4)} | {"agent.units.0."}
    for name, p in net.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved != any(name.startswith(f) for f in frozen), name


def test_a_higher_tau_lowers_the_ponder_cost_gradient_step():
    torch.manual_seed(4)
    spec = get_spec("R32_C10")
    rnet, agent = randomize_bn(build_resnet(spec), 4), build_halting_units(spec)
    net = ActNet(rnet, agent).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = []
    for tau in (0.0, 1.0):
        net.zero_grad()
        act_train_step(net, x, y, tau=tau, penalty=-5.0).loss.backward()
        grads.append(torch.cat([u.bias.grad for u in agent.all_units()]))
    # the ponder cost pushes the halting scores up: its gradient on the biases is negative
    assert float((grads[1] - grads[0]).sum()) < 0


# -- scripts ---------------------------------------------------------------------------
def _reference_block(rnet, agent, dataset):
    """One image at a time: ACT's halting, FLOPs from the table plus the halting units
    of the blocks that ran."""
    def one_image(x):
        out = act_pass(rnet, agent, x, mode="dynamic")
        return out.logits, out.policy
    return reference_block("R32_C10", dataset, one_image,
                           lambda policy: halting_flops(agent, policy)[0])


def test_finetuning_checkpoint_round_trips_through_test_py(tiny_data, tiny_args, tmp_path,
                                                           capsys):
    path, ckpt = finetuned_once(tiny_args, tiny_data, tmp_path / "act_ft", "--agent", "act",
                                "--lr", "1e-2", "--act_eps", "0.05")
    assert ckpt["agent_type"] == "act" and float(ckpt["agent"]["eps"]) == pytest.approx(0.05)
    start = build_halting_units(get_spec("R32_C10")).state_dict()
    assert not torch.equal(ckpt["agent"]["units.2.3.weight"], start["units.2.3.weight"])
    # give the trained units decisions that vary (the tiny run keeps every block), resave
    spec = get_spec("R32_C10")
    rnet, agent = build_resnet(spec), build_halting_units(spec)
    rnet.load_state_dict(ckpt["resnet"])
    agent.load_state_dict(ckpt["agent"])
    rnet.eval()
    agent.eval()
    testset = get_dataset(spec, tiny_data["data_dir"], train=False)
    g = torch.Generator().manual_seed(0)  # calibrated on other images than the test set's
    images = torch.stack([testset[i][0] for i in range(len(testset))])
    noisy = (images.repeat(4, 1, 1, 1) + 0.5 * torch.randn(32, 3, 32, 32, generator=g))
    get_method("act").calibrate(agent, rnet, noisy, 0.5, g)
    calibrated = str(tmp_path / "act_calibrated.t7")
    torch.save({**ckpt, "agent": agent.state_dict()}, calibrated)
    expected = _reference_block(rnet, agent, testset)
    assert "Unique Policies: 1\n" not in expected + "\n", expected  # decisions vary
    capsys.readouterr()
    for extra in ([], ["--batch_size", "1"], ["--masked"], ["--policy", "act"]):
        test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"],
                          "--load", calibrated, "--workers", "0", "--device", "cpu", *extra])
        assert printed_block(capsys.readouterr().out).strip() == expected.strip(), extra


def test_one_finetuning_epoch_trains_through_the_script(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "act_epoch"
    finetune.main(tiny_args(cv, "--agent", "act", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "1", "--test_every", "1", "--act_tau", "0.1"))
    assert sorted(glob.glob(os.path.join(cv, "ckpt_E_1_*.t7")))


def test_bad_input_gives_one_line(tiny_data, tiny_args, tmp_path, capsys):
    for flag, value, words in (("--act_eps", "0", "--act_eps must lie in (0, 1), got 0.0"),
                               ("--act_eps", "1", "--act_eps must lie in (0, 1), got 1.0"),
                               ("--act_tau", "-1", "--act_tau must be a finite number >= 0")):
        line = error_line(finetune.main, tiny_args(tmp_path / flag, "--agent", "act", flag,
                                                   value, "--base_ckpt", tiny_data["base"]),
                          capsys)
        assert words in line, line
    line = error_line(finetune.main, tiny_args(tmp_path / "other", "--act_tau", "0.5"), capsys)
    assert "--act_tau belongs to the act method" in line
    line = error_line(cl_training.main, tiny_args(tmp_path / "cl", "--agent", "act",
                                                  "--base_ckpt", tiny_data["base"]), capsys)
    assert "act" in line and "finetune" in line, line
    agent = build_halting_units(get_spec("R32_C10"))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(PolicySourceError, match=r"must lie in \(0, 1\]"):
            build_source("act", get_spec("R32_C10"), agent=agent, threshold=bad)
    with pytest.raises(PolicySourceError, match="--agent act"):
        build_source("act", get_spec("R32_C10"), agent=None)
    assert isinstance(agent, HaltingUnits)
