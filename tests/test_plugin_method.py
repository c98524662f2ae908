"""A new method needs no edit outside its own file: one defined here is registered, trained
one finetuning step by finetune.py, saved, and evaluated by test.py from its checkpoint
(docs/adding-a-method.md walks through the same example)."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import finetune
import test as test_script
from helpers import error_line, printed_block
from models import build_resnet, get_spec
from models.flops import flop_table
from policies.method import FINETUNE, METHODS, Method, StepOutput, register
from policies.registry import get_method, method_of
from policies.rewards import straight_through
from policies.source import PolicySource
from utils.checkpoint import read_checkpoint
from utils.dist import wrap
from utils.stats import format_eval_block, policy_stats


class ColourGate(nn.Module):
    """Keep-probabilities of every block from the image's mean colour: one linear layer."""

    def __init__(self, num_blocks: int):
        super().__init__()
        self.linear = nn.Linear(3, num_blocks)
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():  # every other block starts dropped
            self.linear.bias.copy_(torch.tensor([1.0, -1.0]).repeat(num_blocks)[:num_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x.mean((2, 3))))


class ColourSource(PolicySource):
    name = "colour"

    def __init__(self, agent: ColourGate, threshold: float):
        self.agent, self.threshold = agent, threshold
        self.policy_flops = 2 * 3 * agent.linear.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.agent(x) >= self.threshold).float()


class Colour(Method):
    """Straight-through gates: hard decisions forward, the sigmoid's gradient backward, and
    a cost per kept block."""

    name = "colour"
    summary = "test method: gates from the mean colour"
    stages = (FINETUNE,)
    agent_class, agent_words = ColourGate, "colour gates"  # what source() accepts

    def add_options(self, parser) -> None:
        group = parser.add_argument_group("colour (--agent colour)")
        self.option(group, "--colour_cost", type=float, default=0.01,
                    help="loss per kept block and image")

    def check_options(self, args) -> list[str]:
        return [] if args.colour_cost >= 0 else ["--colour_cost must be >= 0"]

    def build(self, spec) -> nn.Module:
        return ColourGate(spec.num_blocks)

    def train_step(self, stage, args, rnet, agent, where):
        net = wrap(rnet, where.device, where.info)
        gate = wrap(agent, where.device, where.info)

        def step(inputs, targets, noise, cl_step):
            probs = gate(inputs)
            policy = straight_through(probs)
            logits = net(inputs, policy)
            loss = F.cross_entropy(logits, targets) + args.colour_cost * policy.sum(1).mean()
            return StepOutput(loss, (logits.argmax(1) == targets).float(), policy.detach(),
                              torch.zeros(len(inputs)))
        return nn.ModuleList([net, gate]), step

    def source(self, spec, agent=None, *, k=None, seed=0, threshold=None) -> PolicySource:
        threshold = self.checked_threshold(threshold)  # in threshold_range, or None
        agent = self.checked_agent(spec, agent)  # a ColourGate, or one line
        return ColourSource(agent, 0.5 if threshold is None else threshold)


@pytest.fixture
def colour():
    method = register(Colour())
    yield method
    METHODS.pop(method.name)


def test_a_method_defined_outside_the_package_trains_saves_and_evaluates(
        colour, tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "colour_ft"
    finetune.main(tiny_args(cv, "--agent", "colour", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "1", "--colour_cost", "0.02"))
    path = sorted(glob.glob(os.path.join(cv, "ckpt_E_*.t7")))[-1]
    ckpt = read_checkpoint(path)
    assert ckpt["agent_type"] == "colour" and method_of(ckpt) is colour
    assert set(ckpt["agent"]) == {"linear.weight", "linear.bias"}
    start = ColourGate(15).state_dict()
    assert not torch.equal(ckpt["agent"]["linear.bias"], start["linear.bias"])

    capsys.readouterr()
    test_script.main(["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--load", path,
                      "--batch_size", "3", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith(f"loading checkpoints\nloaded resnet from {os.path.basename(path)}\n"
                          f"loaded agent from {os.path.basename(path)}\n")
    printed = printed_block(out).strip()

    # the same numbers by hand, image by image, from the checkpoint's networks
    spec = get_spec("R32_C10")
    rnet, gate = build_resnet(spec), ColourGate(15)
    rnet.load_state_dict(ckpt["resnet"])
    gate.load_state_dict(ckpt["agent"])
    rnet.eval()
    from utils.data import get_dataset
    testset = get_dataset(spec, tiny_data["data_dir"], train=False)
    policies, matches = [], []
    with torch.no_grad():
        for x, y in testset:
            policy = (gate(x[None]) >= 0.5).float()
            policies.append(policy)
            matches.append(float(rnet(x[None], policy).argmax(1).item() == y))
    pol = torch.cat(policies)
    flops = flop_table(spec.name).per_image(pol, include_policy=False) + 2 * 3 * 15
    assert 0 < pol.sum(1).mean() < 15
    assert printed == format_eval_block(policy_stats(pol.to(torch.uint8), torch.tensor(matches)),
                                        flops.numpy()).strip()


def test_its_options_and_names_go_through_the_registry(colour, tiny_data, tiny_args, tmp_path,
                                                       capsys):
    assert get_method("colour") is colour
    line = error_line(finetune.main, tiny_args(tmp_path / "a", "--agent", "colour",
                                               "--colour_cost", "-1"), capsys)
    assert "--colour_cost must be >= 0" in line
    line = error_line(finetune.main, tiny_args(tmp_path / "b", "--colour_cost", "0.5"), capsys)
    assert "--colour_cost belongs to the colour method" in line
    line = error_line(finetune.main, tiny_args(tmp_path / "c", "--agent", "nosuch"), capsys)
    assert "colour" in line and "blockdrop" in line
