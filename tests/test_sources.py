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
