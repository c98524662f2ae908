"""BlockDrop-seq (supplement): gates, execution paths, training step, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

import test as test_script
from helpers import make_cifar, printed_block, randomize_bn, reference_block
from models import build_resnet, get_spec
from policies.seq import SeqNet, SeqSource, build_seq_agent, seq_pass, seq_train_step
from utils.data import get_dataset


def _models(name, seed=0):
    """An eval-mode ResNet with realistic BatchNorm and gates whose decisions vary from
    image to image: each gate is a random projection of its standardised input."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    rnet = randomize_bn(build_resnet(spec), seed).eval()
    agent = build_seq_agent(spec)
    x = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        h = rnet.stem(x)
        for t, gate in enumerate(agent.gates):
            pooled = h.mean((2, 3))
            mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
            w = torch.randn(2, pooled.shape[1]) / sd / pooled.shape[1] ** 0.5
            gate.weight.copy_(w)
            gate.bias.copy_(-w @ mu + torch.tensor([0.0, 0.3]))
            keep = (gate(pooled).argmax(1) == 1).float().view(-1, 1, 1, 1)
            residual = rnet.residual(t, h)
            h = F.relu(residual + rnet.block(t)(h)) * keep + residual * (1 - keep)
    return rnet, agent


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_gates_see_the_pooled_output_of_the_previous_block(name):
    rnet, agent = _models(name)
    x = torch.rand(4, 3, 32, 32)
    seen = {}
    hooks = [g.register_forward_pre_hook(lambda m, inp, t=t: seen.__setitem__(t, inp[0].clone()))
             for t, g in enumerate(agent.gates)]
    with torch.no_grad():
        out = seq_pass(rnet, agent, x, mode="grouped")
    for h in hooks:
        h.remove()
    policy = out.policy
    assert 0 < policy.sum() < policy.numel(), "the gates keep some blocks and drop others"
    with torch.no_grad():  # the activations a hand-written loop under that policy produces
        h = rnet.stem(x)
        for t in range(rnet.num_blocks):
            assert torch.allclose(seen[t], h.mean((2, 3)), rtol=1e-4, atol=1e-5), t
            residual = rnet.residual(t, h)
            m = policy[:, t].view(-1, 1, 1, 1)
            h = F.relu(residual + rnet.block(t)(h)) * m + residual * (1 - m)
        keep = torch.stack([agent.gates[t](seen[t]).argmax(1) for t in range(rnet.num_blocks)], 1)
    assert torch.equal(keep.float(), policy), "greedy decision = argmax over {drop, keep}"


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_greedy_evaluation_equals_running_the_chosen_blocks(name):
    rnet, agent = _models(name, seed=1)
    source = SeqSource(agent)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        runs = {"grouped": source.run(rnet, x), "masked": source.run(rnet, x, dynamic=False)}
        single = [source.run(rnet, x[i:i + 1]) for i in range(len(x))]
        for logits, policy in runs.values():
            assert torch.equal(policy, torch.cat([p for _, p in single]))
            for i in range(len(x)):
                chosen = rnet.forward_single(x[i:i + 1], policy[i])
                assert torch.allclose(logits[i:i + 1], chosen, rtol=1e-4, atol=1e-3)
                assert torch.allclose(single[i][0], chosen, rtol=1e-4, atol=1e-3)
    assert len(torch.unique(runs["grouped"][1], dim=0)) > 1, "decisions differ between images"


def test_batch_one_skips_dropped_blocks():
    rnet, agent = _models("R32_C10", seed=2)
    calls = []
    hooks = [rnet.block(t).register_forward_hook(lambda m, i, o, t=t: calls.append(t))
             for t in range(rnet.num_blocks)]
    with torch.no_grad():
        _, policy = SeqSource(agent).run(rnet, torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert calls == policy[0].nonzero().view(-1).tolist() and len(calls) < rnet.num_blocks


@pytest.mark.parametrize("curriculum", [True, False])
def test_one_training_step_changes_the_gates(curriculum):
    rnet, agent = _models("R32_C10", seed=3)
    net = SeqNet(rnet, agent)
    if curriculum:
        rnet.eval().requires_grad_(False)
        params = list(agent.parameters())
    else:
        net.train()
        params = list(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    noise = torch.rand(8, rnet.num_blocks, generator=g)
    kwargs = dict(beta=0.1, cl_step=5, mode="grouped") if curriculum else {}
    with torch.no_grad():  # labels the greedy pass gets right: advantages are not all 0
        greedy = net(x, None, 0.8, 10 if curriculum else 0, kwargs.get("mode", "masked"))
        y = greedy.logits.argmax(1)
    out = seq_train_step(net, x, y, noise, alpha=0.8, penalty=-5.0, **kwargs)
    if curriculum:  # the first K - cl_step blocks are forced on
        assert bool((out.policy[:, :10] == 1).all())
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)]
    names = [n for n, _ in net.named_parameters()]
    gates_changed = [c for n, c in zip(names, changed, strict=True) if n.startswith("agent.")]
    resnet_changed = [c for n, c in zip(names, changed, strict=True) if n.startswith("rnet.")]
    assert all(gates_changed[-2:]) and any(gates_changed)
    assert any(resnet_changed) != curriculum


def _reference_block(rnet, agent, dataset, name):
    """One image at a time: greedy gates, the chosen blocks, FLOPs from the table."""
    def one_image(x):
        out = seq_pass(rnet, agent, x, mode="grouped")
        return out.logits, out.policy
    return reference_block(name, dataset, one_image, lambda policy: agent.flops)


def test_checkpoint_round_trips_through_test_py(tmp_path, capsys):
    spec = get_spec("R32_C10")
    data = make_cifar(tmp_path / "data", n=20, seed=4)
    rnet, agent = _models("R32_C10", seed=4)
    ckpt = str(tmp_path / "seq.t7")
    torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "agent_type": "seq",
                "model": "R32_C10", "epoch": 3}, ckpt)
    expected = _reference_block(rnet, agent, get_dataset(spec, data, train=False), "R32_C10")
    for extra in ([], ["--policy", "seq", "--batch_size", "1"], ["--masked"]):
        test_script.main(["--model", "R32_C10", "--load", ckpt, "--data_dir", data,
                          "--workers", "0", *extra])
        assert printed_block(capsys.readouterr().out) == expected + "\n"
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(["--model", "R32_C10", "--load", ckpt, "--data_dir", data,
                          "--policy", "blockdrop", "--workers", "0"])
    assert "holds a 'seq' agent, not 'blockdrop'" in str(exit_info.value.code)
