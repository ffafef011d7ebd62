"""torchvision's Vision Transformer (Dosovitskiy et al., 2021) without pretrained weights:
ViT-B/16 as published, and a ViT of any size for small images and tests.

The transformer's MLP blocks apply ``nn.Linear`` to token sequences [B, T, D], so the
Bayesian Linear layers must place their bias on the last dim under every estimator.
"""

import math

import torchvision
from torch import nn

from pyro_gbnn.errors import UsageError

__all__ = ["PATCH_SIZE", "vit", "vit_b_16"]

PATCH_SIZE = 16


def vit_b_16(num_classes: int, in_channels: int = 3, image_size: int = 224) -> torchvision.models.VisionTransformer:
    """ViT-B/16 for square RGB images whose side is a multiple of 16 (about 86M parameters).

    torchvision's attention keeps its query/key/value projection in
    `nn.MultiheadAttention.in_proj_weight` / `in_proj_bias`, not in an `nn.Linear`: the
    conversion gives them prior sites like any parameter, but no gradient estimator (they
    are used as drawn, one draw per mini-batch).
    Input: (batch, 3, image_size, image_size); output: (batch, num_classes) logits.
    """
    if in_channels != 3:
        raise UsageError(f"vit_b_16 takes 3 input channels, got in_channels={in_channels}")
    if image_size % PATCH_SIZE:
        raise UsageError(f"vit_b_16 needs image_size divisible by {PATCH_SIZE}, got {image_size}")
    return torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=num_classes)


def vit(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    *,
    patch_size: int = 4,
    num_layers: int = 12,
    num_heads: int = 3,
    hidden_dim: int = 192,
    mlp_dim: int = 768,
) -> torchvision.models.VisionTransformer:
    """A torchvision ``VisionTransformer`` of any size, for any number of input channels.

    The keyword-only arguments are the model's ``model_args``. Defaults: ViT-Ti's width
    and depth (Touvron et al. 2021: 12 layers, 3 heads, 192 wide, MLP 768, about 5.4M
    parameters) with 4x4 patches, which give 32x32 images 64 tokens.
    Input: (batch, in_channels, image_size, image_size); output: (batch, num_classes) logits.
    """
    sizes = dict(
        patch_size=patch_size, num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim
    )
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"vit's {arg} must be a positive integer, got {value!r}")
    if image_size % patch_size:
        raise UsageError(f"vit needs image_size divisible by patch_size={patch_size}, got {image_size}")
    if hidden_dim % num_heads:
        raise UsageError(f"vit needs hidden_dim divisible by num_heads={num_heads}, got {hidden_dim}")
    model = torchvision.models.VisionTransformer(image_size=image_size, num_classes=num_classes, **sizes)
    if in_channels != 3:
        model.conv_proj = _patch_embedding(in_channels, hidden_dim, patch_size)
    return model


def _patch_embedding(in_channels: int, hidden_dim: int, patch_size: int) -> nn.Conv2d:
    """torchvision's patch projection and its initialisation, for ``in_channels`` channels."""
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (in_channels * patch_size * patch_size)))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv
