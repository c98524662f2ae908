"""Reproducibility helpers and the ImageNet policy's initialisation from a resnet18 file."""
import random

import numpy as np
import pytest
import torch
import torchvision

from models import build_policy, get_spec
from utils.checkpoint import read_checkpoint
from utils.checkpoint import CheckpointError, init_policy
from utils.data import make_loaders
from utils.seeding import keyed_uniform, rng_state, seed_everything, set_rng_state


def test_keyed_noise_depends_only_on_seed_epoch_and_index():
    a = keyed_uniform(1, 3, torch.tensor([5, 9, 2]), 7)
    b = keyed_uniform(1, 3, torch.tensor([2, 5]), 7)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], keyed_uniform(1, 4, torch.tensor([5]), 7)[0])
    assert not torch.equal(a[0], keyed_uniform(2, 3, torch.tensor([5]), 7)[0])
    assert a.min() >= 0 and a.max() < 1


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    seed_everything(4)
    state = rng_state()
    torch.save({"rng": [state]}, tmp_path / "s.t7")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(99)
    set_rng_state(read_checkpoint(str(tmp_path / "s.t7"))["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_training_order_is_a_function_of_seed_and_epoch_for_any_world():
    data = torch.utils.data.TensorDataset(torch.arange(12).float(), torch.arange(12))

    def global_batches(world, epoch):
        batches = []
        for rank in range(world):
            loader, _, sampler = make_loaders(data, data, 6, 0, 3, rank, world)
            sampler.set_epoch(epoch)
            batches.append([idx.tolist() for _, _, idx in loader])
        return [sorted(sum((b[t] for b in batches), [])) for t in range(len(batches[0]))]

    assert global_batches(1, 0) == global_batches(2, 0) == global_batches(3, 0)
    assert global_batches(1, 0) != global_batches(1, 1)


def test_policy_init_from_a_torchvision_resnet18_file(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    spec = get_spec("R101_ImgNet")
    agent = build_policy(spec)
    head = agent.logit.weight.detach().clone()
    assert init_policy(agent, spec, str(path))
    assert torch.equal(agent.features.conv1.weight, tv.conv1.weight)
    assert torch.equal(agent.features.blocks[2][0].conv2.weight, tv.layer3[0].conv2.weight)
    assert torch.equal(agent.features.ds[1][0].weight, tv.layer2[0].downsample[0].weight)
    assert torch.equal(agent.logit.weight, head)  # the heads keep their own initialisation
    assert not init_policy(agent, spec, None)
    with pytest.raises(CheckpointError, match="ImageNet models only"):
        init_policy(build_policy(get_spec("R32_C10")), get_spec("R32_C10"), str(path))
