"""Hand-computed values of the equations in policies/rewards.py (paper Sec. 3.3, Alg. 1)."""
import math

import pytest
import torch

from policies import rewards as R


def test_greedy_policy_thresholds_at_one_half():
    probs = torch.tensor([[0.49, 0.5, 0.7, 0.0]])
    assert R.greedy_policy(probs).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_bounded_probs_maps_into_one_minus_alpha_to_alpha():
    s = torch.tensor([0.0, 0.5, 1.0, 0.25])
    # s' = 0.8 s + 0.2 (1 - s)
    assert torch.allclose(R.bounded_probs(s, 0.8), torch.tensor([0.2, 0.5, 0.8, 0.35]))
    assert torch.equal(R.bounded_probs(s, 1.0), s)


def test_sample_policy_keeps_where_noise_is_below_probability():
    bprobs = torch.tensor([[0.5, 0.5, 0.2, 0.8]])
    noise = torch.tensor([[0.1, 0.9, 0.2, 0.79]])
    assert R.sample_policy(bprobs, noise).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_block_reward_eq3():
    policy = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    correct = torch.tensor([1, 0, 1])
    # correct: 1 - (2/4)^2 = 0.75; wrong: the penalty; correct with no block: 1
    assert R.block_reward(policy, correct, -5.0).tolist() == [0.75, -5.0, 1.0]


def test_reward_from_logits_and_advantage_eq6():
    preds = torch.tensor([[0.1, 0.9], [2.0, 1.0]])
    targets = torch.tensor([1, 1])
    sampled = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    greedy = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r_s, match = R.reward(preds, targets, sampled, -10.0)
    r_g, _ = R.reward(preds, targets, greedy, -10.0)
    assert match.tolist() == [1.0, 0.0]
    assert r_s.tolist() == [0.75, -10.0]
    assert r_g.tolist() == [1 - (3 / 4) ** 2, -10.0]
    assert torch.allclose(R.advantage(r_s, r_g), torch.tensor([0.75 - 0.4375, 0.0]))


def test_curriculum_mask_and_step():
    assert R.curriculum_mask(2, 5, 2).tolist() == [[0, 0, 0, 1, 1]] * 2
    assert R.curriculum_mask(1, 3, 3).tolist() == [[1, 1, 1]]
    assert R.curriculum_mask(1, 3, 7).tolist() == [[1, 1, 1]]
    assert [R.curriculum_step(e, 54) for e in (0, 1, 52, 53, 100)] == [1, 2, 53, 54, 54]


def test_apply_curriculum_forces_the_first_blocks():
    policy = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    mask = R.curriculum_mask(2, 4, 2)
    assert R.apply_curriculum(policy, mask).tolist() == [[1, 1, 0, 1], [1, 1, 0, 0]]


def test_policy_log_prob():
    bprobs = torch.tensor([[0.8, 0.2, 0.8]])
    policy = torch.tensor([[1.0, 1.0, 0.0]])
    expected = [math.log(0.8), math.log(0.2), math.log(0.2)]
    assert torch.allclose(R.policy_log_prob(bprobs, policy), torch.tensor([expected]))


def test_curriculum_loss_by_hand():
    bprobs = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    policy = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # policy term: only block 2 counts. image 1: -log(1 - 0.2) * 2; image 2: -log(0.5) * -1
    pg = -math.log(0.8) * 2 + -math.log(0.5) * -1
    # entropy term over every block: -s log s
    ent = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2) + 2 * 0.5 * math.log(0.5))
    expected = (pg - 0.1 * ent) / 2
    got = R.curriculum_loss(bprobs, policy, adv, mask, beta=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_curriculum_loss_clamps_only_the_entropy_term():
    bprobs = torch.tensor([[0.0, 1.0]])
    policy = torch.tensor([[0.0, 1.0]])
    loss = R.curriculum_loss(bprobs, policy, torch.tensor([1.0]), torch.ones(1, 2), beta=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-12)


def test_finetune_loss_by_hand():
    bprobs = torch.tensor([[0.8, 0.2]])
    policy = torch.tensor([[1.0, 0.0]])
    adv = torch.tensor([2.0])
    preds = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([1])
    pg = -(math.log(0.8) + math.log(0.8)) * 2  # summed over blocks and the batch
    ce = -math.log(3 / 4)
    got = R.finetune_loss(bprobs, policy, adv, preds, targets)
    assert got.item() == pytest.approx(pg + ce, rel=1e-6)
    scaled = R.finetune_loss(bprobs, policy, adv, preds, targets, sum_scale=2)
    assert scaled.item() == pytest.approx(2 * pg + ce, rel=1e-6)


def test_finetune_loss_sums_the_policy_term_over_the_batch():
    bprobs = torch.full((3, 2), 0.5)
    policy = torch.ones(3, 2)
    adv = torch.ones(3)
    preds = torch.zeros(3, 4)
    targets = torch.zeros(3, dtype=torch.long)
    got = R.finetune_loss(bprobs, policy, adv, preds, targets)
    assert got.item() == pytest.approx(3 * 2 * math.log(2) + math.log(4), rel=1e-6)
