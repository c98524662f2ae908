"""The statistics round like the authors' float32 CUDA tensors did."""
import numpy as np
import torch

from utils.stats import format_eval_block, policy_stats


def test_means_round_like_float32():
    # 1873 of 2000 correct is exactly 0.9365: float32 prints 0.937, float64 would print 0.936
    matches = torch.zeros(2000)
    matches[:1873] = 1
    policies = torch.zeros(2000, 4)
    policies[:, 0] = 1
    stats = policy_stats(policies, matches)
    assert "%.3f" % stats.accuracy == "0.937"
    assert "%.3f" % (1873 / 2000) == "0.936"
    assert "%.3f" % torch.tensor(1873 / 2000, dtype=torch.float32).item() == "0.937"


def test_block_usage_std_and_unique_policies():
    policies = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    stats = policy_stats(policies, torch.tensor([1.0, 0, 1, 1]), torch.tensor([0.5, -5, 0.5, 1.0]))
    usage = np.array([2, 1, 2, 0])
    assert stats.block_usage == 1.25
    assert abs(stats.block_usage_std - usage.std(ddof=1)) < 1e-6  # sample std
    assert stats.unique_policies == 3
    assert stats.accuracy == 0.75 and abs(stats.reward - (-0.75)) < 1e-7


def test_eval_block_uses_population_std_for_flops():
    stats = policy_stats(torch.ones(2, 3), torch.ones(2))
    block = format_eval_block(stats, [100, 300])
    assert block == ("\n    Accuracy: 1.000\n    Block Usage: 3.000 \u00B1 0.000\n"
                     "    FLOPs/img: 2.00E+02 \u00B1 1.00E+02\n    Unique Policies: 1\n    ")
