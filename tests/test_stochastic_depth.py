"""Stochastic depth (Huang et al., ECCV 2016): Eq. 4, the training step, per-row execution,
the checkpoint through test.py, and bad input."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cl_training
import finetune
import test as test_script
from helpers import error_line, printed_block, randomize_bn
from models import build_resnet, get_spec
from models.flops import flop_table
from policies.registry import chosen_method, get_method, method_of
from policies.source import PolicySourceError
from policies.stochastic_depth import (StochasticDepthNet, expected_blocks, sd_pass,
                                       sd_train_step, survival_draw, survival_probabilities,
                                       survival_source)
from utils.checkpoint import read_checkpoint, resnet_state
from utils.data import get_dataset
from utils.engine import classifier_train_step
from utils.seeding import keyed_uniform
from utils.stats import format_eval_block, policy_stats

K = 15  # blocks of R32_C10


def _rnet(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(build_resnet(get_spec("R32_C10")), seed)


def _last_ckpt(folder):
    return sorted(glob.glob(os.path.join(str(folder), "ckpt_E_*.t7")),
                  key=lambda p: int(os.path.basename(p).split("_")[2]))[-1]


# -- Eq. 4 -------------------------------------------------------------------------
def test_survival_probabilities_by_hand():
    # L = 5, p_L = 0.5: p_l = 1 - l/5 * 0.5
    assert survival_probabilities(5, 0.5) == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert survival_probabilities(4, 1.0) == [1.0, 1.0, 1.0, 1.0]
    assert survival_probabilities(2, 0.2) == pytest.approx([0.6, 0.2])
    # expected depth: sum p_l = L - (1 - p_L)(L + 1)/2; ResNet-110 (L = 54): 40.25 blocks
    assert expected_blocks(5, 0.5) == pytest.approx(3.5)
    assert expected_blocks(54, 0.5) == pytest.approx(40.25)


def test_the_draw_keeps_block_t_iff_noise_is_below_p_t():
    noise = torch.tensor([[0.0, 0.85, 0.69, 0.61, 0.49],
                          [0.95, 0.79, 0.71, 0.59, 0.51]])
    keep = survival_draw(noise, survival_probabilities(5, 0.5))
    assert keep.tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]


def test_an_images_draw_does_not_depend_on_its_batch():
    probs = survival_probabilities(K, 0.5)
    whole = survival_draw(keyed_uniform(3, 7, torch.arange(10), K), probs)
    part = survival_draw(keyed_uniform(3, 7, torch.tensor([8, 2]), K), probs)
    assert torch.equal(part, whole[[8, 2]])
    assert not torch.equal(whole, survival_draw(keyed_uniform(3, 8, torch.arange(10), K), probs))


# -- execution: per-row (grouped) == masked -------------------------------------------
def _keep(batch):
    """Blocks 0 and 7 kept by every row, 3 and 14 by none, the rest mixed."""
    g = torch.Generator().manual_seed(batch)
    keep = (torch.rand(batch, K, generator=g) < 0.5).float()
    keep[:, [0, 7]] = 1
    keep[:, [3, 14]] = 0
    if batch > 1:
        keep[0, 5], keep[1, 5] = 1, 0  # block 5 mixed
    return keep


def _reference(rnet, x, keep, probs):
    """The masked rule written out: relu(residual + F(x) / p_t) or the residual, per row."""
    h = rnet.stem(x)
    for t in range(rnet.num_blocks):
        residual = rnet.residual(t, h)
        m = keep[:, t].view(-1, 1, 1, 1)
        h = F.relu(residual + rnet.block(t)(h) / probs[t]) * m + residual * (1 - m)
    return rnet.head(h)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("grad", [False, True])
def test_per_row_execution_equals_the_masked_pass(batch, grad):
    rnet = _rnet(1).eval()
    probs = survival_probabilities(K, 0.5)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keep = _keep(batch)
    with torch.set_grad_enabled(grad):
        grouped = sd_pass(rnet, x, keep, probs, "grouped")
        masked = sd_pass(rnet, x, keep, probs, "masked")
        reference = _reference(rnet, x, keep, probs)
    assert torch.allclose(grouped, masked, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grouped, reference, rtol=1e-4, atol=1e-5)
    if batch > 1:
        rows = [sd_pass(rnet, x[i:i + 1], keep[i:i + 1], probs) for i in range(batch)]
        assert torch.allclose(grouped, torch.cat(rows), rtol=1e-4, atol=1e-5)


def test_a_block_runs_only_on_the_rows_that_keep_it():
    rnet = _rnet(2).eval()
    seen = {}
    hooks = [rnet.block(t).register_forward_hook(
        lambda m, i, o, t=t: seen.__setitem__(t, i[0].shape[0])) for t in range(K)]
    keep = _keep(4)
    with torch.no_grad():
        sd_pass(rnet, torch.rand(4, 3, 32, 32), keep, survival_probabilities(K, 0.5))
        counts = {t: int(n) for t, n in enumerate(keep.sum(0).tolist()) if n}
        assert seen == counts  # blocks 3 and 14 never run, block 0 on all 4 rows
        seen.clear()
        one = _keep(1)
        sd_pass(rnet, torch.rand(1, 3, 32, 32), one, survival_probabilities(K, 0.5))
    for h in hooks:
        h.remove()
    assert sorted(seen) == one[0].nonzero().view(-1).tolist() and len(seen) < K


@pytest.mark.parametrize("threshold,kept", [(None, K), (0.0, K), (0.5, K), (0.75, 7),
                                            (survival_probabilities(K, 0.5)[0], 1)])
def test_the_test_time_source_runs_for_real(threshold, kept):
    rnet = _rnet(3).eval()
    source = survival_source(K, threshold=threshold)
    assert source.name == "stochastic_depth" and source.k == kept and source.policy_flops == 0
    assert source.vector.tolist() == [1.0] * kept + [0.0] * (K - kept)  # the earliest blocks
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        dynamic, policy = source.run(rnet, x)
        masked, _ = source.run(rnet, x, dynamic=False)
        single = torch.cat([source.run(rnet, x[i:i + 1])[0] for i in range(4)])
    assert torch.allclose(dynamic, masked, rtol=1e-4, atol=1e-5)
    assert torch.allclose(single, masked, rtol=1e-4, atol=1e-5)
    if threshold is None:
        with torch.no_grad():
            assert torch.allclose(dynamic, rnet(x), rtol=1e-4, atol=1e-5)


# -- the training step -------------------------------------------------------------------
def test_one_step_moves_only_blocks_that_survive_for_some_image():
    rnet = _rnet(4).train()
    probs = survival_probabilities(K, 0.5)
    net = StochasticDepthNet(rnet, probs)
    noise = torch.rand(6, K, generator=torch.Generator().manual_seed(1))
    noise[:, 3] = 0.99  # p_4 = 0.867: every image drops block 3
    noise[:, 14] = 0.6  # p_15 = 0.5: every image drops block 14
    noise[:, 0] = 0.0  # every image keeps block 0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = sd_train_step(net, x, y, noise, probs)
    keep = survival_draw(noise, probs)
    assert torch.equal(out.policy, keep) and out.match.shape == (6,)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    for t in range(K):
        s, b = rnet.block_index[t]
        prefix = f"rnet.blocks.{s}.{b}."
        block_moved = {n for n in moved if n.startswith(prefix)}
        if keep[:, t].any():
            assert block_moved == {n for n in before if n.startswith(prefix)}, t
        else:
            assert not block_moved, t
    assert {"rnet.conv1.weight", "rnet.fc.weight"} <= moved


def test_an_image_that_drops_a_block_gives_it_no_gradient():
    rnet = _rnet(5).eval()  # BatchNorm on running statistics: rows do not interact
    probs = survival_probabilities(K, 0.5)
    x = torch.rand(4, 3, 32, 32)
    keep = _keep(4)
    for i in range(4):
        rnet.zero_grad()
        logits = sd_pass(rnet, x, keep, probs)
        F.cross_entropy(logits[i:i + 1], torch.tensor([i])).backward()
        for t in range(K):
            grad = rnet.block(t).conv1.weight.grad
            has = grad is not None and bool(grad.abs().sum() > 0)
            assert has == bool(keep[i, t]), (i, t)


def test_with_p_one_the_step_is_the_plain_cross_entropy_step():
    a, b = _rnet(6).train(), _rnet(6).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    noise = torch.rand(8, K)
    out = sd_train_step(StochasticDepthNet(a, survival_probabilities(K, 1.0)), x, y, noise,
                        survival_probabilities(K, 1.0))
    plain = classifier_train_step(b, x, y)
    assert bool((out.policy == 1).all())
    assert torch.equal(out.loss, plain.loss)
    out.loss.backward()
    plain.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad), name
    for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb), name


# -- through finetune.py and test.py ------------------------------------------------------
def _by_hand(rnet, data_dir, vector):
    """Image by image: the ResNet under one keep vector; the block test.py prints."""
    spec = get_spec("R32_C10")
    testset = get_dataset(spec, data_dir, train=False)
    matches = []
    with torch.no_grad():
        for x, y in testset:
            matches.append(float(rnet.forward_single(x[None], vector).argmax(1).item() == y))
    policies = vector.expand(len(matches), -1).to(torch.uint8)
    flops = flop_table(spec.name).per_image(vector.expand(len(matches), -1).float(),
                                            include_policy=False)
    return format_eval_block(policy_stats(policies, torch.tensor(matches)),
                             np.asarray(flops)).strip()


def test_checkpoint_round_trips_through_test_py(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "sd"
    finetune.main(tiny_args(cv, "--stochastic_depth", "0.5", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "1"))
    path = _last_ckpt(cv)
    ckpt = read_checkpoint(path)
    assert ckpt["fixed_policy"] == {"name": "stochastic_depth", "k": K, "seed": 0}
    assert ckpt["stochastic_depth"] == 0.5 and "agent" not in ckpt
    assert method_of(ckpt) is get_method("stochastic_depth")
    base = resnet_state(read_checkpoint(tiny_data["base"]))
    assert any(not torch.equal(v, base[k]) for k, v in ckpt["resnet"].items()
               if v.is_floating_point()), "finetuning moved the ResNet"
    rnet = build_resnet(get_spec("R32_C10"))
    rnet.load_state_dict(ckpt["resnet"])
    rnet.eval()
    argv = ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--load", path,
            "--batch_size", "3", "--workers", "0", "--device", "cpu"]
    capsys.readouterr()
    test_script.main(argv)  # no flags: the recorded rule, every block
    printed = printed_block(capsys.readouterr().out).strip()
    assert printed == _by_hand(rnet, tiny_data["data_dir"], torch.ones(K))
    assert f"Block Usage: {K}.000" in printed
    test_script.main(argv + ["--policy", "firstk", "--k", "7"])
    firstk = torch.tensor([1.0] * 7 + [0.0] * 8)
    printed = printed_block(capsys.readouterr().out).strip()
    assert printed == _by_hand(rnet, tiny_data["data_dir"], firstk)
    test_script.main(argv + ["--policy", "distributek", "--k", "7"])
    assert "Block Usage: 7.000" in capsys.readouterr().out


def test_the_flag_chooses_the_method(tiny_args, tmp_path):
    args = finetune.build_parser().parse_args(tiny_args(tmp_path, "--stochastic_depth", "0.3"))
    assert chosen_method(args).name == "stochastic_depth"
    args = finetune.build_parser().parse_args(tiny_args(tmp_path))
    assert chosen_method(args).name == "blockdrop"


def test_bad_input_is_one_line(tiny_data, tiny_args, tmp_path, capsys):
    base = ["--base_ckpt", tiny_data["base"]]
    for value in ("0", "1.5", "-0.2"):
        line = error_line(finetune.main, tiny_args(tmp_path / f"p{value}", *base,
                                                   "--stochastic_depth", value), capsys)
        assert "(0, 1]" in line and value in line
    line = error_line(finetune.main, tiny_args(tmp_path / "seq", *base, "--stochastic_depth",
                                               "0.5", "--agent", "seq"), capsys)
    assert "different regime" in line and "--agent seq" in line
    line = error_line(finetune.main, tiny_args(tmp_path / "fk", *base, "--stochastic_depth",
                                               "0.5", "--policy", "firstk", "--k", "7"), capsys)
    assert "different regime" in line and "--policy firstk" in line
    line = error_line(finetune.main, tiny_args(tmp_path / "pol", *base, "--policy",
                                               "stochastic_depth", "--k", "15"), capsys)
    assert "--stochastic_depth P" in line
    line = error_line(cl_training.main, tiny_args(tmp_path / "cl", *base, "--stochastic_depth",
                                                  "0.5"), capsys)
    assert "finetune.py" in line
    line = error_line(test_script.main, ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"],
                                         "--base_ckpt", tiny_data["base"], "--workers", "0",
                                         "--policy", "stochastic_depth", "--k", "7"], capsys)
    assert "every block" in line and "firstk" in line
    method = get_method("stochastic_depth")
    spec = get_spec("R32_C10")
    for threshold in (-0.1, 0.99, 1.5):
        with pytest.raises(PolicySourceError, match=r"must lie in \[0, 0.9667\]"):
            method.source(spec, threshold=threshold)
    assert method.source(spec, k=K).k == K



@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_the_configs_resolve_through_finetune_py(name):
    from utils.config import check_common, method_problems, resolve

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "configs", "stochastic_depth", f"{name}.yaml")
    args = resolve(finetune.build_parser(), ["--config", path])
    assert (args.model, args.stochastic_depth, args.batch_size) == (name, 0.5, 128)
    assert check_common(args) == [] and method_problems(args) == []
    assert chosen_method(args).name == "stochastic_depth"
