"""Where the ImageNet policy network starts from (paper Sec. 4: the ResNet-10 policy is
initialised from torchvision's ImageNet ``resnet18``; docs/models.md).

The authors' curriculum always started the R101 policy from those weights. Here a fresh
curriculum run of a model whose policy has a torchvision counterpart
(``spec.policy.torchvision_init``) does the same by default, from the local torch hub
cache (``torch.hub.get_dir()/checkpoints/resnet18-*.pth``); when the weights are not there
it stops and says how to get them. ``--policy_init`` chooses explicitly:

* ``torchvision``: download the weights into the hub cache (the user asked for it);
* a path: a torchvision state-dict file;
* ``random``: the policy's own random initialisation.
"""
from __future__ import annotations

import glob
import os

import torch

from utils.checkpoint import CheckpointError

TORCHVISION = "torchvision"
RANDOM = "random"


class PolicyInitError(CheckpointError):
    """The policy's initial weights are not available as asked."""


def hub_cache_file(arch: str) -> str | None:
    """The newest ``<arch>-*.pth`` in the torch hub cache, or None."""
    found = sorted(glob.glob(os.path.join(torch.hub.get_dir(), "checkpoints", f"{arch}-*.pth")))
    return found[-1] if found else None


def download_torchvision(arch: str) -> str:
    """Download torchvision's default ImageNet weights of ``arch`` into the hub cache."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    torch.hub.load_state_dict_from_url(weights.url, progress=True, map_location="cpu")
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def resolve_policy_init(spec, value: str | None, default_from_cache: bool = True
                        ) -> str | None:
    """The state-dict file that initialises ``spec``'s policy features, or None (random).

    ``value`` is ``--policy_init``. Without it, a model with a torchvision counterpart
    uses the hub cache (``default_from_cache``) or stops with the three ways to go on.
    """
    arch = spec.policy.torchvision_init
    if value == RANDOM:
        return None
    if arch is None:
        if value is None:
            return None
        raise PolicyInitError(f"--policy_init: the policy network of {spec.name} has no "
                              f"torchvision counterpart (ImageNet models only)")
    if value == TORCHVISION:
        return download_torchvision(arch)
    if value is not None:
        if not os.path.isfile(value):
            raise PolicyInitError(f"--policy_init {value}: no such file (expected a "
                                  f"torchvision {arch} state dict)")
        return value
    if not default_from_cache:
        return None
    cached = hub_cache_file(arch)
    if cached is None:
        where = os.path.join(torch.hub.get_dir(), "checkpoints", f"{arch}-*.pth")
        raise PolicyInitError(
            f"{spec.name}: the policy starts from torchvision's ImageNet {arch} weights, as in "
            f"the paper, but none are in the torch hub cache ({where}); pass --policy_init "
            f"{TORCHVISION} to download them, --policy_init PATH for a local state-dict file, "
            f"or --policy_init {RANDOM} to start from random weights")
    return cached
