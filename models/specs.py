"""Registry of the model settings of BlockDrop (paper Sec. 4, SPEC section 1).

Each name ``R<depth>_<dataset>`` maps to a frozen :class:`ModelSpec` holding
everything that differs between settings: the base ResNet's layout, the policy
network's layout, the input normalisation and the default base checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

CIFAR10_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """One BlockDrop setting: base ResNet + policy network + data."""

    name: str
    arch: str  # "cifar" (3x3 stem, 16/32/64 widths) or "imagenet" (7x7 stem, bottlenecks)
    layers: Tuple[int, ...]  # residual blocks per stage of the base ResNet
    block: str  # "basic" or "bottleneck"
    num_classes: int
    dataset: str  # "C10", "C100" or "ImgNet"
    policy_layers: Tuple[int, ...]  # blocks per stage of the policy ResNet
    policy_input_pool: int  # the policy sees the image average-pooled by this factor
    policy_avgpool: int  # final average-pool kernel of the policy network
    image_size: int
    base_checkpoint: str  # default path of the pretrained base ResNet
    mean: Optional[Tuple[float, float, float]] = None  # None: raw [0, 1] pixels
    std: Optional[Tuple[float, float, float]] = None

    @property
    def num_blocks(self) -> int:
        """K: the number of residual blocks the policy decides on."""
        return sum(self.layers)


def _cifar(name: str, depth_layers: int, classes: int, dataset: str, ckpt: str,
           normalise: bool = False) -> ModelSpec:
    return ModelSpec(
        name=name, arch="cifar", layers=(depth_layers,) * 3, block="basic",
        num_classes=classes, dataset=dataset, policy_layers=(1, 1, 1),
        policy_input_pool=1, policy_avgpool=8, image_size=32, base_checkpoint=ckpt,
        mean=CIFAR10_MEAN if normalise else None, std=CIFAR10_STD if normalise else None)


MODEL_SPECS = {
    # Only the released R32_C10 base network was trained on normalised inputs.
    "R32_C10": _cifar("R32_C10", 5, 10, "C10",
                      "cv/pretrained/R32_C10/pk_E_164_A_0.923.t7", normalise=True),
    "R110_C10": _cifar("R110_C10", 18, 10, "C10", "cv/pretrained/R110_C10/pk_E_130_A_0.932.t7"),
    "R32_C100": _cifar("R32_C100", 5, 100, "C100", "cv/pretrained/R32_C100/pk_E_164_A_0.693.t7"),
    "R110_C100": _cifar("R110_C100", 18, 100, "C100",
                        "cv/pretrained/R110_C100/pk_E_160_A_0.723.t7"),
    "R101_ImgNet": ModelSpec(
        name="R101_ImgNet", arch="imagenet", layers=(3, 4, 23, 3), block="bottleneck",
        num_classes=1000, dataset="ImgNet", policy_layers=(1, 1, 1, 1), policy_input_pool=2,
        policy_avgpool=4, image_size=224,
        base_checkpoint="cv/pretrained/R101_ImgNet/ImageNet_R101_224_76.464",
        mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def get_spec(name: str) -> ModelSpec:
    """Return the spec of ``name``; an unknown name raises and lists the valid ones."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_SPECS)}") from None
