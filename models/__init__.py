"""BlockDrop models: flat ResNets, their dynamic execution, policy networks and the
registry of model specs."""
from __future__ import annotations

from .dynamic import check_policy
from .policy import PolicyNet
from .resnet import FlatResNet
from .specs import MODEL_SPECS, ModelSpec, get_spec

__all__ = ["FlatResNet", "PolicyNet", "ModelSpec", "MODEL_SPECS", "get_spec", "get_model",
           "build_resnet", "build_policy", "check_policy"]


def build_resnet(spec: ModelSpec) -> FlatResNet:
    """The base ResNet of ``spec``, randomly initialised."""
    return FlatResNet(spec.resnet, spec.num_classes)


def build_policy(spec: ModelSpec) -> PolicyNet:
    """The policy network of ``spec`` (e.g. ResNet-8 or ResNet-10), randomly initialised."""
    features = FlatResNet(spec.policy.net, None)
    return PolicyNet(features, spec.num_blocks, spec.policy.input_pool)


def get_model(name: str) -> tuple[FlatResNet, PolicyNet]:
    """``(rnet, agent)`` for a model name such as ``"R110_C10"``; no weights are loaded."""
    spec = get_spec(name)
    return build_resnet(spec), build_policy(spec)
