"""Operating points from one checkpoint: test.py --threshold and --budget."""
from __future__ import annotations

import json

import pytest
import torch

import test as test_script
from helpers import error_line, printed_block, randomize_bn
from models import build_resnet, get_spec
from models.flops import flop_table
from policies.registry import build_agent
from utils.budget import held_out_split, threshold_for_budget
from utils.data import get_dataset
from utils.engine import evaluate
from utils.networks import Request, load_for_eval



def _checkpoint(tmp_path, method: str) -> str:
    """A finetuned-looking checkpoint of ``method``: random weights, spread decisions."""
    spec = get_spec("R32_C10")
    torch.manual_seed(1)
    rnet = randomize_bn(build_resnet(spec)).eval()
    agent = build_agent(spec, method)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = str(tmp_path / f"{method}.t7")
    torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "agent_type": method,
                "model": "R32_C10", "epoch": 0}, path)
    return path


def _common(tiny_data):
    return ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--workers", "0",
            "--batch_size", "4"]


@pytest.mark.parametrize("method", ["blockdrop", "seq"])
def test_the_default_threshold_is_the_plain_evaluation(method, tiny_data, tmp_path, capsys):
    path = _checkpoint(tmp_path, method)
    test_script.main([*_common(tiny_data), "--load", path])
    plain = printed_block(capsys.readouterr().out)
    test_script.main([*_common(tiny_data), "--load", path, "--threshold", "0.5",
                      "--out", str(tmp_path / "t.json")])
    assert printed_block(capsys.readouterr().out) == plain
    assert json.loads((tmp_path / "t.json").read_text())["threshold"] == 0.5


@pytest.mark.parametrize("method", ["blockdrop", "seq"])
def test_usage_and_flops_fall_as_the_threshold_rises(method, tiny_data, tmp_path):
    spec = get_spec("R32_C10")
    setup = load_for_eval(spec, Request(_checkpoint(tmp_path, method)))
    loader = torch.utils.data.DataLoader(get_dataset(spec, tiny_data["data_dir"], False),
                                         batch_size=4)
    usage, flops = [], []
    for t in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        result = evaluate(setup.rnet, setup.at_threshold(spec, t), loader, torch.device("cpu"),
                          flops=flop_table(spec.name), progress=False)
        usage.append(result.stats.block_usage)
        flops.append(float(result.flops.mean()))
    assert usage == sorted(usage, reverse=True) and flops == sorted(flops, reverse=True)
    assert usage[0] == spec.num_blocks and usage[-1] < usage[0]


def test_a_budget_lands_within_the_resolution_of_a_sweep(tiny_data, tmp_path, capsys):
    spec = get_spec("R32_C10")
    path = _checkpoint(tmp_path, "blockdrop")
    setup = load_for_eval(spec, Request(path))
    held = held_out_split(spec, tiny_data["data_dir"], 12, seed=3)
    loader = torch.utils.data.DataLoader(held, batch_size=4)
    cpu = torch.device("cpu")

    def mean_flops(t: float) -> float:
        result = evaluate(setup.rnet, setup.at_threshold(spec, t), loader, cpu,
                          flops=flop_table(spec.name), progress=False)
        return float(result.flops.mean())
    grid = {t / 32: mean_flops(t / 32) for t in range(33)}
    budget = (max(grid.values()) + min(grid.values())) / 2
    choice = threshold_for_budget(setup.rnet, lambda t: setup.at_threshold(spec, t), spec,
                                  loader, cpu, budget, seed=3)
    best_on_grid = min(abs(f - budget) for f in grid.values())
    assert abs(choice.held_out_flops - budget) <= best_on_grid
    assert choice.held_out_flops == mean_flops(choice.threshold)
    assert choice.images == 12 and choice.seed == 3

    out = tmp_path / "b.json"
    test_script.main([*_common(tiny_data), "--load", path, "--budget", str(budget),
                      "--budget_images", "12", "--budget_seed", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Threshold: " in printed and "(12 training images, seed 3)" in printed
    stats = json.loads(out.read_text())
    assert stats["budget"] == budget and stats["held_out_images"] == 12
    assert stats["threshold"] == pytest.approx(choice.threshold)


def test_bad_operating_points(tiny_data, tmp_path, capsys):
    path = _checkpoint(tmp_path, "blockdrop")
    common = [*_common(tiny_data), "--load", path]
    assert "must lie in [0, 1]" in error_line(test_script.main, [*common, "--threshold", "1.5"],
                                              capsys)
    line = error_line(test_script.main, [*common, "--policy", "firstk", "--k", "3",
                                         "--threshold", "0.3"], capsys)
    assert "--threshold applies to learned methods" in line
    line = error_line(test_script.main, [*common, "--budget", "1e3", "--budget_images", "8"],
                      capsys)
    assert "out of reach" in line and "FLOPs per image" in line
    line = error_line(test_script.main, [*common, "--budget", "1e8", "--threshold", "0.5"],
                      capsys)
    assert "give one" in line
