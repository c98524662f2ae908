"""BlockDrop models: flat ResNets, policy networks and the registry of settings."""
from __future__ import annotations

from typing import Tuple

from .policy import PolicyNet
from .resnet import FlatResNet, check_policy
from .specs import MODEL_SPECS, ModelSpec, get_spec

__all__ = ["FlatResNet", "PolicyNet", "ModelSpec", "MODEL_SPECS", "get_spec", "get_model",
           "build_resnet", "build_policy", "check_policy"]


def build_resnet(spec: ModelSpec) -> FlatResNet:
    """The base ResNet of ``spec``, randomly initialised."""
    pool = 8 if spec.arch == "cifar" else 7
    return FlatResNet(spec.arch, spec.block, spec.layers, spec.num_classes, avgpool=pool)


def build_policy(spec: ModelSpec) -> PolicyNet:
    """The policy network of ``spec`` (ResNet-8 or ResNet-10), randomly initialised."""
    features = FlatResNet(spec.arch, "basic", spec.policy_layers, None, avgpool=spec.policy_avgpool)
    return PolicyNet(features, spec.num_blocks, spec.policy_input_pool)


def get_model(name: str) -> Tuple[FlatResNet, PolicyNet]:
    """``(rnet, agent)`` for a model name such as ``"R110_C10"``; no weights are loaded."""
    spec = get_spec(name)
    return build_resnet(spec), build_policy(spec)
