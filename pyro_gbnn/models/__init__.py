"""Deterministic torch networks, built by name, for the Bayesian conversion to act on.

Every learned weight lives in a standard layer (Conv2d, Linear, BatchNorm2d, LayerNorm),
so the conversion can find the Conv2d/Linear parameters by walking the modules.
"""

from typing import Callable

from torch import nn

from pyro_gbnn.errors import UsageError
from pyro_gbnn.models.lenet import LeNet
from pyro_gbnn.models.mlp import MLP
from pyro_gbnn.models.resnet import STEMS, default_stem, resnet
from pyro_gbnn.models.resnet_cifar import CifarResNet, resnet20
from pyro_gbnn.models.vit import vit_b_16
from pyro_gbnn.models.wide_resnet import WideResNet, wide_resnet

__all__ = [
    "MODELS",
    "STEMS",
    "CifarResNet",
    "LeNet",
    "MLP",
    "WideResNet",
    "build_model",
    "default_stem",
    "resnet",
    "resnet20",
    "vit_b_16",
    "wide_resnet",
]

_Builder = Callable[[int, int, int, "str | None"], nn.Module]


def _torchvision_resnet(name: str) -> _Builder:
    return lambda num_classes, in_channels, image_size, stem: resnet(
        name, num_classes, in_channels, image_size, stem
    )


_BUILDERS: dict[str, _Builder] = {
    "mlp": lambda num_classes, in_channels, image_size, stem: MLP(num_classes, in_channels, image_size),
    "lenet": lambda num_classes, in_channels, image_size, stem: LeNet(num_classes, in_channels, image_size),
    "resnet20": lambda num_classes, in_channels, image_size, stem: resnet20(num_classes, in_channels),
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "wrn28_10": lambda num_classes, in_channels, image_size, stem: wide_resnet(28, 10, num_classes, in_channels),
    "vit_b_16": lambda num_classes, in_channels, image_size, stem: vit_b_16(num_classes, in_channels, image_size),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)

_HAS_STEM = ("resnet18", "resnet50", "resnet101")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
) -> nn.Module:
    """Build network `name` (one of `MODELS`) with fresh, untrained weights.

    Input: (batch, in_channels, image_size, image_size); output: (batch, num_classes) logits.
    `stem` ("cifar" or "imagenet") applies only to resnet18/50/101; None picks by image size.
    """
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if value < 1:
            raise UsageError(f"{arg} must be a positive integer, got {value}")
    if stem is not None and name not in _HAS_STEM:
        raise UsageError(f"stem={stem!r} applies only to {', '.join(_HAS_STEM)}, not {name!r}")
    return _BUILDERS[name](num_classes, in_channels, image_size, stem)
