"""FLOP convention of footnote 3 (docs/flops.md): pinned values and per-image sums."""
import torch

from models.flops import flop_table


def test_pinned_full_network_flops():
    assert flop_table("R32_C10").full_resnet == 137_725_184
    assert flop_table("R110_C10").full_resnet == 505_775_360
    assert flop_table("R101_ImgNet").full_resnet == 15_602_810_880
    assert flop_table("R101_ImgNet").policy == 471_918_592
    assert flop_table("R56_C10").full_resnet == 250_971_392
    assert flop_table("R50_ImgNet").full_resnet == 8_178_368_512


def test_cifar_tables():
    t = flop_table("R110_C10")
    assert len(t.block_costs) == 54
    # first blocks of stages 2 and 3 are strided: 16->32 and 32->64 at a quarter of the area
    assert t.block_costs[18] == t.block_costs[36] == 7_077_888
    assert set(t.block_costs) == {9_437_184, 7_077_888}
    # ResNet-8 policy: stem + 3 blocks + logit (64x54) + vnet (64x1)
    assert t.policy == 884_736 + 9_437_184 + 2 * 7_077_888 + 2 * 64 * 54 + 2 * 64
    assert flop_table("R32_C100").full_resnet == 137_725_184 + 2 * 64 * 90


def test_per_image_flops_of_a_batch():
    t = flop_table("R32_C10")
    policy = torch.zeros(3, 15)
    policy[1] = 1
    policy[2, [0, 5]] = 1
    got = t.per_image(policy)
    fixed = t.resnet_fixed + t.policy
    assert got.tolist() == [fixed, fixed + sum(t.block_costs),
                            fixed + t.block_costs[0] + t.block_costs[5]]
    assert t.per_image(policy, include_policy=False)[1] == t.full_resnet
