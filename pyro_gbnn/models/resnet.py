"""torchvision's ImageNet ResNets, with a choice of stem for small images."""

from collections.abc import Callable

import torchvision
from torch import nn

from pyro_gbnn.errors import UsageError

STEMS = ("cifar", "imagenet")

_CONSTRUCTORS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}


def default_stem(image_size: int) -> str:
    """ "cifar" up to 64x64 images, where a 4x down-sampling stem would discard most pixels."""
    return "cifar" if image_size <= 64 else "imagenet"


def resnet(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    stem: str | None = None,
) -> torchvision.models.ResNet:
    """Build `name` ("resnet18", "resnet50" or "resnet101") without pretrained weights.

    stem "imagenet" keeps torchvision's 7x7 stride-2 conv and 3x3 stride-2 max-pool;
    "cifar" replaces them by a 3x3 stride-1 conv and no pooling, the usual choice for
    32x32 inputs. None picks by `image_size` (see `default_stem`).
    Input: (batch, in_channels, H, W); output: (batch, num_classes) logits.
    """
    if name not in _CONSTRUCTORS:
        raise UsageError(f"unknown ResNet {name!r}; expected one of {', '.join(_CONSTRUCTORS)}")
    stem = default_stem(image_size) if stem is None else stem
    if stem not in STEMS:
        raise UsageError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")
    model = _CONSTRUCTORS[name](weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return model
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
