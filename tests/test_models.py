"""Every model builds; the four forward paths share one block-dropping rule."""
import pytest
import torch
import torchvision
from helpers import randomize_bn

from models import MODEL_SPECS, build_policy, build_resnet, get_model, get_spec
from utils.checkpoint import load_base_resnet, load_torchvision_policy_init

CIFAR = ["R32_C10", "R110_C10", "R32_C100", "R110_C100"]


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_every_model_builds_and_runs(name):
    spec = get_spec(name)
    rnet, agent = get_model(name)
    assert rnet.num_blocks == spec.num_blocks == sum(spec.layers)
    size = spec.image_size
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        probs, value = agent.eval()(x)
        logits = rnet.eval().forward_dynamic(x, (probs >= 0.5).float())
    assert probs.shape == (1, spec.num_blocks) and value.shape == (1, 1)
    assert ((probs > 0) & (probs < 1)).all()
    assert logits.shape == (1, spec.num_classes)


def test_state_dict_keys_follow_the_authors_layout():
    rnet, agent = get_model("R101_ImgNet")
    keys = set(rnet.state_dict())
    assert {"conv1.weight", "bn1.running_var", "blocks.2.22.conv3.weight", "blocks.3.2.bn3.bias",
            "ds.0.0.weight", "ds.3.1.running_mean", "fc.weight"} <= keys
    akeys = set(agent.state_dict())
    assert {"features.conv1.weight", "features.blocks.3.0.conv2.weight", "features.ds.1.0.weight",
            "logit.weight", "vnet.bias"} <= akeys
    assert not any(k.startswith("features.fc") for k in akeys)
    cifar, _ = get_model("R32_C10")
    assert not any(k.startswith("ds.") for k in cifar.state_dict())  # parameter-free shortcuts


@pytest.mark.parametrize("name,layers,k", [("R56_C10", (9, 9, 9), 27), ("R56_C100", (9, 9, 9), 27),
                                           ("R50_ImgNet", (3, 4, 6, 3), 16)])
def test_models_beyond_the_paper(name, layers, k):
    spec = get_spec(name)
    assert spec.layers == layers and spec.num_blocks == k
    rnet, agent = get_model(name)
    assert rnet.num_blocks == k and agent.logit.out_features == k
    assert sum(p.numel() for p in agent.features.parameters()) == sum(
        p.numel() for p in get_model(name.replace("R56", "R32").replace("R50", "R101"))[1]
        .features.parameters())  # the same ResNet-8 / ResNet-10 policy as the paper's models


def test_widest_activation_from_the_spec():
    """CPU chunks are sized by the widest tensor of the actual layout."""
    assert get_spec("R110_C10").resnet.widest_activation(32, 32) == 16 * 32 * 32
    assert get_spec("R50_ImgNet").resnet.widest_activation(224, 224) == 64 * 112 * 112
    assert get_spec("R101_ImgNet").policy.net.widest_activation(112, 112) == 64 * 56 * 56


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="R110_C10.*R101_ImgNet"):
        get_model("R50_C10")


@pytest.mark.parametrize("name", CIFAR)
def test_forward_paths_agree(name):
    torch.manual_seed(0)
    rnet = randomize_bn(build_resnet(get_spec(name))).eval()
    x = torch.rand(6, 3, 32, 32)
    k = rnet.num_blocks
    policy = (torch.rand(6, k) < 0.5).float()
    policy[0] = 0  # every block dropped
    policy[1] = 1  # every block kept
    with torch.no_grad():
        full = rnet.forward_full(x)
        masked_ones = rnet(x, torch.ones(6, k))
        masked = rnet(x, policy)
        dynamic = rnet.forward_dynamic(x, policy)
        single = torch.cat([rnet.forward_single(x[i:i + 1], policy[i]) for i in range(6)])
    scale = full.abs().max()
    assert torch.allclose(masked_ones, full, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(dynamic, masked, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(single, masked, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(masked[1], full[1], atol=1e-5 * scale, rtol=0)


def test_dropped_first_block_still_runs_the_shortcut():
    rnet = build_resnet(get_spec("R32_C10")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = rnet.forward_single(x, torch.zeros(15))
        h = rnet.stem(x)
        for s in range(3):
            h = rnet.ds[s](h)
        manual = rnet.fc(torch.nn.functional.avg_pool2d(h, 8).flatten(1))
    assert torch.allclose(out, manual)
    assert h.shape == (2, 64, 8, 8)


@pytest.mark.parametrize("bad, match", [
    (torch.ones(2, 14), r"\(batch=2, K=15\)"),
    (torch.ones(15), r"\(batch=2, K=15\)"),
    (torch.full((2, 15), 0.5), "0 \\(drop\\) or 1 \\(keep\\)"),
    (torch.ones(2, 15, dtype=torch.complex64), "bool, integer or float"),
])
def test_bad_policies_are_rejected(bad, match):
    rnet = build_resnet(get_spec("R32_C10")).eval()
    x = torch.rand(2, 3, 32, 32)
    for fwd in (rnet.forward, rnet.forward_dynamic):
        with pytest.raises(ValueError, match=match):
            fwd(x, bad)


@pytest.mark.parametrize("name,tv_name", [("R101_ImgNet", "resnet101"), ("R50_ImgNet", "resnet50")])
def test_torchvision_resnet_gives_identical_outputs(name, tv_name, tmp_path):
    """A torchvision state dict (random init, nothing downloaded), saved to a file, loads
    through the base-network loader and gives torchvision's outputs on every path."""
    torch.manual_seed(0)
    spec = get_spec(name)
    assert spec.torchvision_base == tv_name
    tv = randomize_bn(getattr(torchvision.models, tv_name)(weights=None), seed=1).eval()
    path = tmp_path / f"{tv_name}.pth"
    torch.save(tv.state_dict(), path)
    rnet = build_resnet(spec).eval()
    load_base_resnet(rnet, str(path))
    x = torch.rand(1, 3, 224, 224)
    k = spec.num_blocks
    with torch.no_grad():
        ref = tv(x)
        assert torch.allclose(rnet.forward_full(x), ref, atol=1e-4, rtol=1e-4)
        assert torch.allclose(rnet(x), ref, atol=1e-4, rtol=1e-4)
        assert torch.allclose(rnet.forward_dynamic(x, torch.ones(1, k)), ref, atol=1e-4, rtol=1e-4)


def test_torchvision_resnet18_initialises_the_imagenet_policy():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(weights=None), seed=2).eval()
    agent = build_policy(get_spec("R101_ImgNet")).eval()
    load_torchvision_policy_init(agent, tv.state_dict())
    for i in range(1, 5):  # ResNet-10: the first block of each ResNet-18 stage
        layer = getattr(tv, f"layer{i}")
        setattr(tv, f"layer{i}", torch.nn.Sequential(layer[0]))
    tv.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = tv(torch.nn.functional.avg_pool2d(x, 2))  # the policy sees 112x112
        feats = agent.features.forward_full(torch.nn.functional.avg_pool2d(x, 2))
        probs, _ = agent(x)
    assert torch.allclose(feats, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(probs, torch.sigmoid(agent.logit(ref)), atol=1e-6)
