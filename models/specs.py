"""Registry of the model settings of BlockDrop (paper Sec. 4; docs/models.md).

Each name ``R<depth>_<dataset>`` maps to a frozen :class:`ModelSpec` that
describes everything that differs between settings, as data: the layout of the
base ResNet and of the policy ResNet (:class:`NetSpec`), the data and its
transforms (:class:`DataSpec`), the pretraining recipe and the default base
checkpoint. Code reads these fields; adding a network is one registry entry
(docs/adding-a-model.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

CIFAR10_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StemSpec:
    """The first convolution (``channels`` out, ``kernel``, ``stride``, padding
    kernel // 2), its BatchNorm and ReLU, then optionally a 3x3/2 max-pool."""

    channels: int
    kernel: int
    stride: int
    maxpool: bool


@dataclass(frozen=True)
class NetSpec:
    """The layout of one flat ResNet.

    ``block``: ``"basic"`` or ``"bottleneck"`` (keys of ``models.resnet.BLOCK_TYPES``).
    ``shortcut``: how a stage's first block matches shapes when they change,
    ``"zero_pad"`` (average-pool by the stride, zero-pad the channels; no
    parameters) or ``"conv"`` (1x1 conv with the stride + BatchNorm).
    ``final_pool``: the kernel of the average pool before the classifier.
    """

    stem: StemSpec
    widths: tuple[int, ...]  # planes of each stage (output width / block expansion)
    strides: tuple[int, ...]
    layers: tuple[int, ...]  # residual blocks per stage
    block: str
    shortcut: str
    final_pool: int

    def __post_init__(self) -> None:
        if not len(self.widths) == len(self.strides) == len(self.layers):
            raise ValueError(f"widths {self.widths}, strides {self.strides} and layers "
                             f"{self.layers} must have one entry per stage")

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * self.expansion

    def widest_activation(self, height: int, width: int) -> int:
        """Elements per image of the widest tensor a forward pass holds on an input
        of ``height`` x ``width`` (stem output, block inputs, outputs and insides)."""
        h = math.ceil(height / self.stem.stride)
        w = math.ceil(width / self.stem.stride)
        widest = self.stem.channels * h * w
        if self.stem.maxpool:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        for planes, stride in zip(self.widths, self.strides, strict=True):
            if self.expansion > 1:  # a bottleneck's first 1x1 conv keeps the input resolution
                widest = max(widest, planes * h * w)
            h, w = math.ceil(h / stride), math.ceil(w / stride)
            widest = max(widest, planes * self.expansion * h * w)
        return widest


@dataclass(frozen=True)
class PolicySpec:
    """The policy network: a feature ResNet without classifier on the image
    average-pooled by ``input_pool``, then the ``logit`` and ``vnet`` heads.
    ``torchvision_init``: the torchvision ResNet whose first block of each stage
    may initialise the features (``--policy_init``), or None."""

    net: NetSpec
    input_pool: int = 1
    torchvision_init: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """The dataset and its transforms (docs/models.md).

    ``kind``: the dataset kind, a key of ``utils.data.READERS`` (``"cifar10"``,
    ``"cifar100"``, ``"image_folder"``). Training: resize to ``resize`` (if set), random crop of
    ``image_size`` with ``crop_padding`` pixels of padding, horizontal flip.
    Test: resize and centre crop when ``resize`` is set, else the image as is.
    ``mean``/``std`` None: raw [0, 1] pixels.
    """

    kind: str
    image_size: int
    resize: int | None = None
    crop_padding: int = 0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class PretrainRecipe:
    """Base-network pretraining (pretrain_resnet.py): SGD batch size and epochs; the
    learning rate decays at ``epochs * n // d`` for each fraction ``(n, d)`` and at
    every multiple of ``decay_every`` (0: never)."""

    batch_size: int
    epochs: int
    decay_fractions: tuple[tuple[int, int], ...] = ()
    decay_every: int = 0

    def milestones(self, epochs: int) -> list[int]:
        """The decay epochs for a run of ``epochs`` (a repeated one decays twice)."""
        at = [epochs * n // d for n, d in self.decay_fractions]
        if self.decay_every > 0:
            at += list(range(self.decay_every, epochs, self.decay_every))
        return sorted(at)


@dataclass(frozen=True)
class ModelSpec:
    """One BlockDrop setting: base ResNet + policy network + data + recipes."""

    name: str
    resnet: NetSpec
    num_classes: int
    policy: PolicySpec
    data: DataSpec
    pretrain: PretrainRecipe
    # default path of the pretrained base ResNet; a glob pattern picks the newest match
    base_checkpoint: str
    # the torchvision ResNet whose state dict fits the base network (--init_torchvision)
    torchvision_base: str | None = None

    @property
    def num_blocks(self) -> int:
        """K: the number of residual blocks the policy decides on."""
        return self.resnet.num_blocks

    @property
    def layers(self) -> tuple[int, ...]:
        return self.resnet.layers

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def mean(self) -> tuple[float, float, float] | None:
        return self.data.mean

    @property
    def std(self) -> tuple[float, float, float] | None:
        return self.data.std


# -- the two families of the paper -------------------------------------------
CIFAR_NET = NetSpec(stem=StemSpec(16, 3, 1, maxpool=False), widths=(16, 32, 64),
                    strides=(1, 2, 2), layers=(1, 1, 1), block="basic", shortcut="zero_pad",
                    final_pool=8)
IMAGENET_NET = NetSpec(stem=StemSpec(64, 7, 2, maxpool=True), widths=(64, 128, 256, 512),
                       strides=(1, 2, 2, 2), layers=(1, 1, 1, 1), block="bottleneck",
                       shortcut="conv", final_pool=7)
CIFAR_POLICY = PolicySpec(CIFAR_NET)  # ResNet-8 on the full 32x32 image
IMAGENET_POLICY = PolicySpec(replace(IMAGENET_NET, block="basic", final_pool=4), input_pool=2,
                             torchvision_init="resnet18")  # ResNet-10 at 112x112
CIFAR_RECIPE = PretrainRecipe(128, 164, decay_fractions=((1, 2), (3, 4)))
IMAGENET_RECIPE = PretrainRecipe(256, 90, decay_every=30)
IMAGENET_DATA = DataSpec("image_folder", 224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _cifar(name: str, per_stage: int, classes: int, ckpt: str,
           normalise: bool = False) -> ModelSpec:
    data = DataSpec("cifar10" if classes == 10 else "cifar100", 32, crop_padding=4,
                    mean=CIFAR10_MEAN if normalise else None,
                    std=CIFAR10_STD if normalise else None)
    return ModelSpec(name=name, resnet=replace(CIFAR_NET, layers=(per_stage,) * 3),
                     num_classes=classes, policy=CIFAR_POLICY, data=data,
                     pretrain=CIFAR_RECIPE, base_checkpoint=ckpt)


def _imagenet(name: str, layers: tuple[int, ...], ckpt: str, torchvision: str) -> ModelSpec:
    return ModelSpec(name=name, resnet=replace(IMAGENET_NET, layers=layers), num_classes=1000,
                     policy=IMAGENET_POLICY, data=IMAGENET_DATA, pretrain=IMAGENET_RECIPE,
                     base_checkpoint=ckpt, torchvision_base=torchvision)


MODEL_SPECS = {
    # Only the released R32_C10 base network was trained on normalised inputs.
    "R32_C10": _cifar("R32_C10", 5, 10, "cv/pretrained/R32_C10/pk_E_164_A_0.923.t7",
                      normalise=True),
    "R110_C10": _cifar("R110_C10", 18, 10, "cv/pretrained/R110_C10/pk_E_130_A_0.932.t7"),
    "R32_C100": _cifar("R32_C100", 5, 100, "cv/pretrained/R32_C100/pk_E_164_A_0.693.t7"),
    "R110_C100": _cifar("R110_C100", 18, 100, "cv/pretrained/R110_C100/pk_E_160_A_0.723.t7"),
    "R101_ImgNet": _imagenet("R101_ImgNet", (3, 4, 23, 3),
                             "cv/pretrained/R101_ImgNet/ImageNet_R101_224_76.464", "resnet101"),
    # Beyond the paper; no released checkpoints. The default is the newest file that
    # pretrain_resnet.py writes with its default recipe (or pass --base_ckpt).
    "R56_C10": _cifar("R56_C10", 9, 10, "cv/pretrained/R56_C10/pk_E_164_A_*.t7"),
    "R56_C100": _cifar("R56_C100", 9, 100, "cv/pretrained/R56_C100/pk_E_164_A_*.t7"),
    "R50_ImgNet": _imagenet("R50_ImgNet", (3, 4, 6, 3), "cv/pretrained/R50_ImgNet/pk_E_90_A_*.t7",
                            "resnet50"),
}


def get_spec(name: str) -> ModelSpec:
    """Return the spec of ``name``; an unknown name raises and lists the valid ones."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_SPECS)}") from None


__all__ = ["StemSpec", "NetSpec", "PolicySpec", "DataSpec", "PretrainRecipe", "ModelSpec",
           "MODEL_SPECS", "get_spec"]
