"""forward_dynamic and forward_policies agree with the masked forward (the block-dropping
rule of docs/models.md)."""
from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn

from models import get_model
from models.dynamic import chunk_size
from models.fast import FastOptions, FoldedBlock, inference_copy
from scripts.benchmark import random_policies
from policies.blockdrop import curriculum_train_step

# (model, image size, batch): R101 needs 224x224 for its 7x7 head pool
CASES = [("R32_C10", 32, 6), ("R110_C10", 32, 5), ("R32_C100", 32, 6),
         ("R110_C100", 32, 5), ("R101_ImgNet", 224, 2)]


def _models(name: str, seed: int = 0):
    """Models in eval mode; CPU chunking off, so that the per-block paths are tested."""
    torch.manual_seed(seed)
    rnet, agent = get_model(name)
    rnet.cpu_chunk_bytes = agent.features.cpu_chunk_bytes = 0
    return rnet.eval(), agent.eval()


def assert_same_logits(expected: torch.Tensor, got: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / scale) < 1e-5
    assert torch.equal(got.argmax(1), expected.argmax(1))


def policy_batch(batch: int, num_blocks: int, gen: torch.Generator) -> dict:
    """Random policies plus the edge cases: all dropped, all kept, shared rows."""
    two = torch.randint(0, 2, (2, num_blocks), generator=gen).float()
    return {
        "random": torch.randint(0, 2, (batch, num_blocks), generator=gen).float(),
        "none": torch.zeros(batch, num_blocks),
        "all": torch.ones(batch, num_blocks),
        "two_distinct": two[torch.arange(batch) % 2],  # the grouped path
    }


@pytest.mark.parametrize("name,size,batch", CASES)
def test_dynamic_equals_masked(name, size, batch):
    rnet, _ = _models(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=gen)
    policies = policy_batch(batch, rnet.num_blocks, gen)
    if name == "R101_ImgNet":  # keep the big model's test short
        policies = {k: policies[k] for k in ("random", "two_distinct")}
    with torch.no_grad():
        for kind, policy in policies.items():
            expected = rnet(x, policy)
            assert_same_logits(expected, rnet.forward_dynamic(x, policy))
            if kind == "all":
                assert_same_logits(expected, rnet.forward_full(x))


def test_dynamic_paths_small_model():
    """Batch of one, bool/int policies, gradient mode and the single-policy path."""
    rnet, _ = _models("R32_C10")
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(7, 3, 32, 32, generator=gen)
    policy = random_policies(7, rnet.num_blocks, 7, gen)
    with torch.no_grad():
        expected = rnet(x, policy)
        assert_same_logits(expected, rnet.forward_dynamic(x, policy.bool()))
        assert_same_logits(expected, rnet.forward_dynamic(x, policy.long()))
        for i in range(7):
            assert_same_logits(expected[i:i + 1], rnet.forward_dynamic(x[i:i + 1], policy[i:i + 1]))
            assert_same_logits(expected[i:i + 1], rnet.forward_single(x[i:i + 1], policy[i]))
    x.requires_grad_(True)  # with autograd the in-place writes are avoided
    out = rnet.forward_dynamic(x, policy)
    assert_same_logits(expected, out.detach())
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dynamic_channels_last():
    """channels_last weights and inputs: the gathers keep the layout, results agree."""
    rnet, _ = _models("R110_C10")
    rnet.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(6, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    policy = random_policies(6, rnet.num_blocks, 17, gen)
    with torch.no_grad():
        assert_same_logits(rnet(x, policy), rnet.forward_dynamic(x, policy))
        assert_same_logits(rnet(x, policy), rnet.forward_policies(x, [policy])[0])


def test_dynamic_leaves_inputs_alone():
    rnet, _ = _models("R32_C10")
    x = torch.rand(4, 3, 32, 32)
    policy = torch.randint(0, 2, (4, rnet.num_blocks)).float()
    x0, p0 = x.clone(), policy.clone()
    with torch.inference_mode():
        rnet.forward_dynamic(x, policy)
    assert torch.equal(x, x0) and torch.equal(policy, p0)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(3, 15), r"shape \(batch=4, K=15\)"),
    (torch.ones(4, 14), r"shape \(batch=4, K=15\)"),
    (torch.ones(4, 15, 1), r"shape \(batch=4, K=15\)"),
    (torch.ones(15), r"shape \(batch=4, K=15\)"),
    (torch.full((4, 15), 0.5), "0 \\(drop\\) or 1 \\(keep\\)"),
    (torch.full((4, 15), 2), "0 \\(drop\\) or 1 \\(keep\\)"),
    (torch.full((4, 15), float("nan")), "0 \\(drop\\) or 1 \\(keep\\)"),
    (torch.ones(4, 15, dtype=torch.complex64), "bool, integer or float"),
    ([[1] * 15] * 4, r"tensor of shape \(4, 15\)"),
])
def test_bad_policies_raise_before_compute(bad, match, monkeypatch):
    rnet, _ = _models("R32_C10")
    calls = []
    monkeypatch.setattr(rnet, "stem", lambda x: calls.append(x))
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match=match):
        rnet.forward_dynamic(x, bad)
    with pytest.raises(ValueError, match=match):
        rnet.forward_policies(x, [torch.ones(4, 15), bad])
    assert not calls


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_forward_policies_equal_masked(name):
    rnet, _ = _models(name)
    gen = torch.Generator().manual_seed(3)
    batch, K = 6, rnet.num_blocks
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    greedy = torch.randint(0, 2, (batch, K), generator=gen).float()
    greedy[:, :K // 2] = 1  # a curriculum: the leading blocks are kept by every policy
    sampled = greedy.clone()
    sampled[:3, K // 2:] = torch.randint(0, 2, (3, K - K // 2), generator=gen).float()
    cases = [[greedy, sampled], [sampled], [greedy, greedy, torch.zeros(batch, K)],
             [torch.ones(batch, K), torch.zeros(batch, K)]]
    with torch.no_grad():
        for policies in cases:
            fast = rnet.forward_policies(x, policies)
            slow = rnet.forward_policies(x, policies, dynamic=False)
            assert len(fast) == len(policies)
            for f, s, p in zip(fast, slow, policies, strict=True):
                assert_same_logits(rnet(x, p), s)
                assert_same_logits(s, f)
    assert rnet.forward_policies(x, []) == []


def curriculum_steps(runs, cl_step: int):
    """The engine's curriculum step of one batch, once per ``(resnet, dynamic)`` in
    ``runs``, from the same policy weights: ``[(StepOutput, policy gradients)]``."""
    _, agent = _models("R32_C10")
    agent.train()
    start = {k: v.clone() for k, v in agent.state_dict().items()}
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    noise = torch.rand(8, 15, generator=gen)
    results = []
    for net, dynamic in runs:
        agent.load_state_dict(start)
        agent.zero_grad()
        out = curriculum_train_step(net, agent, x, y, noise, alpha=0.8, beta=0.1,
                                    penalty=-10.0, cl_step=cl_step, dynamic=dynamic)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in agent.parameters() if p.grad is not None]))
    return results


@pytest.mark.parametrize("cl_step", [3, 15])
def test_fast_curriculum_step_matches_masked(cl_step):
    """The engine's curriculum step: two masked forwards vs one forward_policies pass
    give the same policies, rewards, loss and policy gradient."""
    rnet, _ = _models("R32_C10")
    (o0, g0), (o1, g1) = curriculum_steps([(rnet, False), (rnet, True)], cl_step)
    assert torch.equal(o0.policy, o1.policy)
    assert (o0.policy[:, :15 - cl_step] == 1).all()
    assert torch.equal(o0.reward, o1.reward) and torch.equal(o0.match, o1.match)
    assert torch.equal(o0.loss, o1.loss)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)


def test_cpu_chunking_changes_nothing():
    """Eval-mode CPU chunking (forced to 3 images here) gives the unchunked logits on
    every path; train mode never chunks (BatchNorm would see other batches)."""
    rnet, agent = _models("R32_C10")
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    policy = torch.randint(0, 2, (8, rnet.num_blocks), generator=gen).float()
    other = torch.randint(0, 2, (8, rnet.num_blocks), generator=gen).float()
    paths = {
        "masked": lambda: rnet(x, policy),
        "dynamic": lambda: rnet.forward_dynamic(x, policy),
        "full": lambda: rnet.forward_full(x),
        "single": lambda: rnet.forward_single(x, policy[0]),
        "policies": lambda: torch.cat(rnet.forward_policies(x, [policy, other])),
        "agent": lambda: agent(x)[0],
    }
    with torch.no_grad():
        whole = {k: f() for k, f in paths.items()}
        per_image = 16 * 32 * 32 * 4
        for net in (rnet, agent.features):
            net.cpu_chunk_bytes = 3 * per_image
        assert chunk_size(rnet, x) == 3
        for k, f in paths.items():
            assert_same_logits(whole[k], f())
    rnet.train()
    assert chunk_size(rnet, x) == 8


def test_empty_batch():
    rnet, _ = _models("R32_C10")
    with torch.no_grad():
        out = rnet.forward_dynamic(torch.rand(0, 3, 32, 32), torch.zeros(0, rnet.num_blocks))
    assert out.shape == (0, 10)


FAST = [FastOptions(fold_bn=True, channels_last=False), FastOptions(fold_bn=False,
        channels_last=True), FastOptions(fold_bn=True, channels_last=True)]


@pytest.mark.parametrize("name,size,batch,fast", [
    *[("R110_C10", 32, 5, fast) for fast in FAST],
    # bottleneck blocks and conv shortcuts, folded (~30 s each on two cores): with the
    # layout (test.py's CPU default) always, without it under --runslow
    *[pytest.param("R101_ImgNet", 224, 2, fast,
                   marks=() if fast.channels_last else pytest.mark.slow)
      for fast in FAST if fast.fold_bn]])
def test_inference_copies_equal_the_masked_network(name, size, batch, fast):
    """Folded BatchNorm and channels_last: every path of the copy equals the masked
    forward of the original (random BatchNorm statistics); the original is unchanged."""
    rnet, agent = _models(name)
    randomize_bn(rnet, seed=1)
    randomize_bn(agent, seed=2)
    before = {k: v.clone() for k, v in rnet.state_dict().items()}
    frnet, fagent = inference_copy(rnet, fast), inference_copy(agent, fast)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in frnet.modules())
    assert has_bn != fast.fold_bn
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(batch, 3, size, size, generator=gen)
    policies = policy_batch(batch, rnet.num_blocks, gen)
    assert not any(k.startswith("joint") for k in fagent.state_dict())  # fused heads: not saved
    with torch.no_grad():
        (probs, value), (fprobs, fvalue) = agent(x), fagent(x)
        assert_same_logits(probs, fprobs)
        assert_same_logits(value, fvalue)
        for policy in policies.values():
            expected = rnet(x, policy)
            assert_same_logits(expected, frnet(x, policy))
            assert_same_logits(expected, frnet.forward_dynamic(x, policy))
            assert_same_logits(expected[:1], frnet.forward_single(x[:1], policy[0]))
            assert_same_logits(expected[:1], frnet.forward_dynamic(x[:1], policy[:1]))
            fast_logits = frnet.forward_policies(x, [policy, policies["random"]])
            assert_same_logits(expected, fast_logits[0])
        assert_same_logits(rnet.forward_full(x), frnet.forward_full(x))
    assert all(torch.equal(before[k], v) for k, v in rnet.state_dict().items())


@pytest.mark.parametrize("fast", FAST)
def test_fast_curriculum_step_on_an_inference_copy_matches_masked(fast):
    """cl_training.py's default: the step's ResNet passes on the inference copy, dynamic;
    the authors' way: the network as built, masked. Same policies and rewards, the same
    loss and gradient up to float rounding."""
    rnet, _ = _models("R32_C10")
    randomize_bn(rnet, seed=1)
    (o0, g0), (o1, g1) = curriculum_steps(
        [(rnet, False), (inference_copy(rnet, fast), True)], cl_step=5)
    assert torch.equal(o0.policy, o1.policy) and torch.equal(o0.reward, o1.reward)
    assert torch.allclose(o0.loss, o1.loss, rtol=1e-6, atol=1e-7)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_folded_blocks_follow_their_parameters():
    """Folded blocks run their convolutions directly from cached parameters; converting
    the copy (dtype, device, layout) refreshes them, so it still equals the original."""
    rnet, _ = _models("R32_C10")
    randomize_bn(rnet, seed=3)
    frnet = inference_copy(rnet, FastOptions(fold_bn=True, channels_last=False))
    assert all(isinstance(frnet.block(t), FoldedBlock) for t in range(rnet.num_blocks))
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    policy = random_policies(3, rnet.num_blocks, 7, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = rnet.double()(x, policy)
        frnet = frnet.double().to(memory_format=torch.channels_last)
        assert_same_logits(expected, frnet.forward_dynamic(x, policy))
        assert_same_logits(expected, frnet(x, policy))
