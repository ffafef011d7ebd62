"""Deterministic torch networks, built by name, for the Bayesian conversion to act on.

Every learned weight lives in a standard layer (Conv2d, Linear, BatchNorm2d, LayerNorm),
so the conversion can find the Conv2d/Linear parameters by walking the modules; the ViTs
add their class token, position embedding and attention projections (parameters of
torchvision's modules, given prior sites but no gradient estimator).
"""

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pyro_gbnn.errors import UsageError
from pyro_gbnn.models.lenet import LeNet
from pyro_gbnn.models.mlp import MLP
from pyro_gbnn.models.resnet import STEMS, default_stem, resnet
from pyro_gbnn.models.resnet_cifar import CifarResNet, resnet20
from pyro_gbnn.models.vit import vit, vit_b_16
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
    "model_args",
    "resnet",
    "resnet20",
    "vit",
    "vit_b_16",
    "wide_resnet",
]

# A builder takes (num_classes, in_channels, image_size); its keyword-only parameters are
# the model's ``model_args``.
_Builder = Callable[..., nn.Module]


def _torchvision_resnet(name: str) -> _Builder:
    return lambda num_classes, in_channels, image_size, *, stem=None: resnet(
        name, num_classes, in_channels, image_size, stem
    )


_BUILDERS: dict[str, _Builder] = {
    "mlp": lambda num_classes, in_channels, image_size: MLP(num_classes, in_channels, image_size),
    "lenet": lambda num_classes, in_channels, image_size: LeNet(num_classes, in_channels, image_size),
    "resnet20": lambda num_classes, in_channels, image_size: resnet20(num_classes, in_channels),
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "wrn28_10": lambda num_classes, in_channels, image_size: wide_resnet(28, 10, num_classes, in_channels),
    "vit_b_16": lambda num_classes, in_channels, image_size: vit_b_16(num_classes, in_channels, image_size),
    "vit": vit,
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)


def model_args(name: str) -> tuple[str, ...]:
    """The keyword arguments (``config["model_args"]``) that model ``name`` accepts."""
    parameters = inspect.signature(_BUILDERS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _models_accepting(arg: str) -> list[str]:
    return [name for name in MODELS if arg in model_args(name)]


def _check_model_args(name: str, given: dict[str, Any]) -> None:
    unknown = [arg for arg in given if arg not in model_args(name)]
    if unknown:
        accepted = ", ".join(model_args(name)) or "no model_args"
        hints = [f"{arg!r} applies to {', '.join(models)}" for arg in unknown if (models := _models_accepting(arg))]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UsageError(f"model {name!r} does not accept {', '.join(map(repr, unknown))}; it accepts {accepted}{hint}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    **model_args: Any,
) -> nn.Module:
    """Build network `name` (one of `MODELS`) with fresh, untrained weights.

    Input: (batch, in_channels, image_size, image_size); output: (batch, num_classes) logits.
    `model_args` are the model's own settings (see :func:`model_args`): `stem` ("cifar"
    or "imagenet"; None picks by image size) for resnet18/50/101; `patch_size`,
    `num_layers`, `num_heads`, `hidden_dim`, `mlp_dim` for `vit` (see
    :func:`~pyro_gbnn.models.vit.vit`).
    """
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if value < 1:
            raise UsageError(f"{arg} must be a positive integer, got {value}")
    _check_model_args(name, model_args)
    return _BUILDERS[name](num_classes, in_channels, image_size, **model_args)
