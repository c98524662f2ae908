"""Policy sources (policies): Table 1's fixed heuristics and the learned ones."""
import pytest
import torch

from models import build_policy, get_spec
from policies.seq import build_seq_agent
from policies.fixed import ceil_usage, stage_quotas
from policies.registry import build_agent, build_source, method_names
from policies.source import PolicySourceError
from models.flops import flop_table


def _kept(source, spec, batch=3):
    policy = source(torch.rand(batch, 3, spec.image_size, spec.image_size))
    assert policy.shape == (batch, spec.num_blocks)
    assert bool((policy == policy[:1]).all()), "a fixed policy is the same for every image"
    return policy[0].nonzero().view(-1).tolist()


@pytest.mark.parametrize("name,k,expected", [
    ("R32_C10", 7, [0, 1, 2, 3, 4, 5, 6]),
    ("R110_C10", 17, list(range(17))),
    ("R110_C10", 54, list(range(54))),
])
def test_firstk(name, k, expected):
    spec = get_spec(name)
    source = build_source("firstk", spec, k=k)
    assert _kept(source, spec) == expected
    assert (source.name, source.k, source.policy_flops) == ("firstk", k, 0)


@pytest.mark.parametrize("name,k,expected", [
    # quotas 3,2,2; stage of 5 keeping m: floor(j*5/m)
    ("R32_C10", 7, [0, 1, 3, 5, 7, 10, 12]),
    ("R32_C10", 1, [0]),
    ("R32_C10", 3, [0, 5, 10]),
    ("R32_C10", 15, list(range(15))),
    # quotas 6,6,5; stage of 18 keeping 6: 0,3,..,15; keeping 5: 0,3,7,10,14
    ("R110_C10", 17, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 43, 46, 50]),
    ("R110_C10", 4, [0, 9, 18, 36]),
])
def test_distributek(name, k, expected):
    spec = get_spec(name)
    source = build_source("distributek", spec, k=k)
    assert _kept(source, spec) == expected
    assert source.k == k and source.policy_flops == 0


def test_distributek_fills_small_stages_first():
    # ResNet-101's stages hold 3, 4, 23 and 3 blocks: the full ones stop taking blocks
    assert stage_quotas((3, 4, 23, 3), 25) == [3, 4, 15, 3]
    assert stage_quotas((3, 4, 23, 3), 6) == [2, 2, 1, 1]
    assert len(build_source("distributek", get_spec("R101_ImgNet"), k=25).vector.nonzero()) == 25


@pytest.mark.parametrize("name,k", [("R32_C10", 7), ("R110_C10", 17)])
def test_randomk_is_one_seeded_draw(name, k):
    spec = get_spec(name)
    torch.manual_seed(123)
    a = _kept(build_source("randomk", spec, k=k, seed=0), spec)
    torch.manual_seed(456)  # the global random state does not matter
    assert _kept(build_source("randomk", spec, k=k, seed=0), spec) == a
    assert len(a) == k == len(set(a)) and all(0 <= t < spec.num_blocks for t in a)
    draws = {tuple(_kept(build_source("randomk", spec, k=k, seed=s), spec)) for s in range(6)}
    assert len(draws) > 1, "--seed picks the draw"
    assert a != list(range(k))


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_blockdrop_source_is_the_greedy_policy_and_counts_its_flops(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    agent = build_policy(spec).eval()
    source = build_source("blockdrop", spec, agent=agent)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        probs, _ = agent(x)
        assert torch.equal(source(x), (probs >= 0.5).float())
    assert source.k is None and source.policy_flops == flop_table(name).policy > 0


@pytest.mark.parametrize("name", ["R32_C10", "R110_C10"])
def test_seq_source_counts_its_gates(name):
    spec = get_spec(name)
    source = build_source("seq", spec, agent=build_seq_agent(spec))
    per_stage = spec.layers[0]
    # block inputs: the stem and stage 1 (16 ch), stage 2 (32), stage 3 (64); 2 outputs each
    channels = [16] * (per_stage + 1) + [32] * per_stage + [64] * (per_stage - 1)
    assert source.policy_flops == sum(2 * c * 2 for c in channels)
    assert source.k is None and not source.one_shot
    with pytest.raises(TypeError, match="run"):
        source(torch.rand(1, 3, 32, 32))


def test_bad_source_requests():
    spec = get_spec("R32_C10")
    with pytest.raises(PolicySourceError, match="unknown policy 'lastk'; registered: "):
        build_source("lastk", spec, k=3)
    for k in (0, 16, None, "auto"):
        with pytest.raises(PolicySourceError, match="between 1 and 15"):
            build_source("firstk", spec, k=k)
    with pytest.raises(PolicySourceError, match="policy network"):
        build_source("blockdrop", spec)
    with pytest.raises(PolicySourceError, match="seq"):
        build_source("seq", spec, agent=build_policy(spec))
    with pytest.raises(PolicySourceError, match="one-shot policy network"):
        build_source("blockdrop", spec, agent=build_seq_agent(spec))
    with pytest.raises(PolicySourceError, match="unknown agent 'lstm'; registered: .*seq"):
        build_agent(spec, "lstm")
    assert {"blockdrop", "firstk", "randomk", "distributek", "everyother", "seq"} <= set(
        method_names())
    with pytest.raises(PolicySourceError, match="fixed policy and has no network"):
        build_agent(spec, "firstk")


def test_k_is_the_mean_usage_rounded_up():
    assert [ceil_usage(u) for u in (16.933, 20.1, 17.0, 0.2)] == [17, 21, 17, 1]


@pytest.mark.parametrize("name", method_names(learned=True))
def test_every_learned_source_checks_its_network_and_threshold(name):
    """One place (Method.checked_agent / checked_threshold) refuses another method's network,
    a network for another model, and a threshold outside the method's range or not finite."""
    from policies.registry import get_method
    method = get_method(name)
    r32, r110 = get_spec("R32_C10"), get_spec("R110_C10")
    own = method.build(r32)
    other = next(get_method(n).build(r32) for n in method_names(learned=True)
                 if not isinstance(get_method(n).build(r32), type(own)))
    with pytest.raises(PolicySourceError, match=f"the {name} source needs .* --agent {name}"):
        method.source(r32, other)
    if hasattr(own, "num_blocks"):
        with pytest.raises(PolicySourceError, match="decide 15 blocks, R110_C10 has 54"):
            method.source(r110, own)
    low, high = method.threshold_range
    for bad in (high + 0.5, low - 0.5, float("nan")):
        with pytest.raises(PolicySourceError, match=f"--threshold for {name} must lie in"):
            method.source(r32, own, threshold=bad)
    method.source(r32, own, threshold=high)  # the range's ends are thresholds
    if method.threshold_low_open:
        with pytest.raises(PolicySourceError, match=r"must lie in \("):
            method.source(r32, own, threshold=low)
    else:
        method.source(r32, own, threshold=low)


@pytest.mark.parametrize("name", [n for n in method_names(learned=True)
                                  if not build_source(n, get_spec("R32_C10"),
                                                      agent=build_agent(get_spec("R32_C10"), n)
                                                      ).one_shot])
def test_methods_that_decide_as_they_run_give_the_same_in_chunks(name):
    """models.dynamic.in_chunks splits a CPU batch by memory; each chunk's logits and
    policy are joined back: the result is the unchunked one."""
    from helpers import randomize_bn
    from models import build_resnet
    from policies.registry import get_method
    spec = get_spec("R32_C10")
    torch.manual_seed(0)
    rnet = randomize_bn(build_resnet(spec)).eval()
    method = get_method(name)
    agent = randomize_bn(method.build(spec), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    method.calibrate(agent, rnet, torch.rand(16, 3, 32, 32, generator=g), 0.5, g)
    source = method.source(spec, agent)
    x = torch.rand(7, 3, 32, 32, generator=g)
    with torch.no_grad():
        rnet.cpu_chunk_bytes = 0  # one pass
        whole = source.run(rnet, x)
        rnet.cpu_chunk_bytes = 1  # one image per chunk
        chunked = source.run(rnet, x)
        empty = source.run(rnet, x[:0])
    assert torch.equal(whole[1], chunked[1]) and 0 < float(whole[1].mean()) < 1
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-4, atol=1e-5)
    assert empty[0].shape == (0, 10) and empty[1].shape == (0, 15)


def test_a_pass_refuses_an_unknown_mode_and_a_network_for_another_resnet():
    from models import build_resnet
    from policies.convnet_aig import aig_pass
    from policies.seq import seq_pass
    from policies.skipnet import skip_pass
    r32 = build_resnet(get_spec("R32_C10")).eval()
    x = torch.rand(1, 3, 32, 32)
    for name, run in (("seq", seq_pass), ("convnet_aig", aig_pass), ("skipnet", skip_pass)):
        agent = build_agent(get_spec("R110_C10"), name)
        with pytest.raises(ValueError, match="decides 54 blocks, the ResNet has 15"):
            run(r32, agent, x)
        with pytest.raises(ValueError, match="mode must be one of .* got 'sideways'"):
            run(r32, build_agent(get_spec("R32_C10"), name), x, mode="sideways")
