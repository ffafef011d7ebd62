"""Shapes, parameter counts and argument checks for the networks in `pyro_gbnn.models`."""

import pytest
import torch
from torch import nn

from pyro_gbnn.errors import UsageError
from pyro_gbnn.models import MODELS, build_model, wide_resnet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, in_channels, image_size",
    [
        ("mlp", 1, 28),
        ("lenet", 1, 28),
        ("resnet20", 3, 32),
        ("resnet18", 3, 32),
        ("resnet20", 1, 32),
        ("mlp", 3, 32),
        ("lenet", 3, 32),
    ],
)
def test_forward_shape(name: str, in_channels: int, image_size: int) -> None:
    model = build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet18_imagenet_stem_on_64x64() -> None:
    model = build_model("resnet18", num_classes=7, image_size=64, stem="imagenet").eval()
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_resnet_stem_defaults_to_image_size() -> None:
    small = build_model("resnet18", num_classes=10, image_size=64)
    large = build_model("resnet18", num_classes=10, image_size=96)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_resnet_imagenet_stem_honours_in_channels() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=1, stem="imagenet")
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mlp", 478_410),  # 784-400-400-10
        ("lenet", 317_066),
        ("resnet20", 272_474),  # 269,722 with option-A shortcuts, plus two 1x1 conv + BN
        ("resnet18", 11_173_962),
    ],
)
def test_parameter_count_small(name: str, expected: int) -> None:
    in_channels, image_size = (1, 28) if name in ("mlp", "lenet") else (3, 32)
    assert n_params(build_model(name, 10, in_channels, image_size)) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet50", 23_520_842),
        ("resnet101", 42_512_970),
        ("wrn28_10", 36_479_194),
    ],
)
def test_parameter_count_large(name: str, expected: int) -> None:
    assert n_params(build_model(name, 10)) == expected


def test_vit_b_16_parameter_count() -> None:
    assert n_params(build_model("vit_b_16", 1000, image_size=224)) == 86_567_656


def vit_parameter_count(c: int, image: int, patch: int, layers: int, hidden: int, mlp: int, classes: int) -> int:
    """Patch projection, class token, position embedding, blocks, final LayerNorm, head."""
    tokens = (image // patch) ** 2 + 1
    block = 2 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) + 2 * hidden
    block += hidden * mlp + mlp + mlp * hidden + hidden
    embed = c * patch * patch * hidden + hidden + hidden + tokens * hidden
    return embed + layers * block + 2 * hidden + hidden * classes + classes


@pytest.mark.parametrize("in_channels, image_size", [(1, 28), (3, 16)])
def test_tiny_vit_forward_shape_and_parameter_count(in_channels: int, image_size: int) -> None:
    sizes = dict(patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    model = build_model("vit", 10, in_channels, image_size, **sizes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert n_params(model) == vit_parameter_count(in_channels, image_size, 4, 2, 16, 32, 10)


def test_vit_defaults_are_vit_ti_sized() -> None:
    assert n_params(build_model("vit", 10)) == vit_parameter_count(3, 32, 4, 12, 192, 768, 10)


@pytest.mark.parametrize(
    "name, model_args, named",
    [
        ("vit", {"patch": 4}, ["'patch'", "patch_size, num_layers, num_heads, hidden_dim, mlp_dim"]),
        ("resnet20", {"stem": "cifar"}, ["'stem'", "no model_args", "resnet18, resnet50, resnet101"]),
        ("resnet18", {"patch_size": 4}, ["'patch_size'", "accepts stem", "applies to vit"]),
        ("vit", {"num_layers": "2"}, ["num_layers", "'2'"]),
        ("vit", {"hidden_dim": 10, "num_heads": 4}, ["hidden_dim", "num_heads=4", "10"]),
        ("vit", {"patch_size": 5}, ["patch_size=5", "32"]),
    ],
)
def test_bad_model_args_are_named_in_one_line(name: str, model_args: dict, named: list) -> None:
    with pytest.raises(UsageError) as info:
        build_model(name, 10, **model_args)
    assert "\n" not in str(info.value)
    assert all(part in str(info.value) for part in named), str(info.value)


def test_wide_resnet_forward_small() -> None:
    model = wide_resnet(depth=10, width=1, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_only_standard_layers_hold_parameters() -> None:
    allowed = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    for name in ("mlp", "lenet", "resnet20", "resnet18"):
        for module in build_model(name, 10).modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert isinstance(module, allowed), (name, type(module))


def test_unknown_name_lists_models() -> None:
    with pytest.raises(UsageError, match="resnet20") as info:
        build_model("resnet19", 10)
    assert "resnet19" in str(info.value) and "\n" not in str(info.value)
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="vit_b_16", num_classes=10, image_size=40),
        dict(name="vit_b_16", num_classes=10, in_channels=1, image_size=32),
        dict(name="vit_b_16", num_classes=10, image_size=32, patch_size=4),
        dict(name="vit", num_classes=10, image_size=30),
        dict(name="resnet18", num_classes=10, stem="tiny"),
        dict(name="resnet20", num_classes=10, stem="cifar"),
        dict(name="lenet", num_classes=10, image_size=12),
        dict(name="mlp", num_classes=0),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        build_model(**kwargs)


@pytest.mark.parametrize("depth", [27, 4])
def test_wide_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(UsageError, match=str(depth)):
        wide_resnet(depth, 10, 10)
