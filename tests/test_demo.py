"""The demo's dataset: CIFAR format, balanced classes, difficulty read back; the comparison runs."""
import numpy as np
import pytest
import torch

from legacy_writer import legacy_state_dict, save_pytorch03
from models import get_model, get_spec
from scripts import demo_data
from utils.data import get_dataset


def test_dataset_round_trip(tmp_path):
    demo_data.write_demo_dataset(str(tmp_path), train=50, test=20, hard_fraction=0.5, seed=1)
    spec = get_spec("R32_C10")
    train, test = get_dataset(spec, str(tmp_path), True), get_dataset(spec, str(tmp_path), False)
    assert len(train) == 50 and len(test) == 20
    assert test.classes == list(demo_data.CLASSES)
    assert sorted(set(train.targets)) == list(range(10))
    difficulty = demo_data.read_difficulty(str(tmp_path))
    assert difficulty.shape == (20,) and set(difficulty) <= {0, 1}
    assert 0 < demo_data.read_difficulty(str(tmp_path), train=True).mean() < 1


def test_hard_images_have_less_contrast():
    rng = np.random.default_rng(0)
    easy = np.stack([demo_data.draw(k % 10, False, rng) for k in range(40)]).astype(float)
    hard = np.stack([demo_data.draw(k % 10, True, rng) for k in range(40)]).astype(float)
    # far more pixel-to-pixel noise, while clean images keep their full-colour shapes
    def noise(imgs):
        return np.mean(np.abs(np.diff(imgs, axis=2)))

    def spread(imgs):
        return np.mean([np.percentile(i, 99) - np.percentile(i, 1) for i in imgs])

    assert noise(hard) > 2.5 * noise(easy)
    assert spread(easy) > 150


def test_compare_difficulty_reports_both_groups(tmp_path):
    demo_data.write_demo_dataset(str(tmp_path), train=10, test=12, seed=2)
    torch.manual_seed(0)
    rnet, agent = get_model("R32_C10")
    ckpt = str(tmp_path / "ft.t7")
    save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet)}, ckpt)
    table = demo_data.compare_difficulty("R32_C10", ckpt, str(tmp_path))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["images", "count"] and "of 15" in lines[0]
    counts = [int(line.split()[1]) for line in lines[1:]]
    assert [line.split()[0] for line in lines[1:]] == ["easy", "hard"] and sum(counts) == 12


def test_not_a_demo_dataset(tmp_path):
    from helpers import make_cifar
    make_cifar(tmp_path, n=4)
    with pytest.raises(ValueError, match="not a demo dataset"):
        demo_data.read_difficulty(str(tmp_path))
