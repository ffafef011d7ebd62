"""torchvision's ViT-B/16 (Dosovitskiy et al., 2021) without pretrained weights."""

import torchvision

from pyro_gbnn.errors import UsageError

PATCH_SIZE = 16


def vit_b_16(num_classes: int, in_channels: int = 3, image_size: int = 224) -> torchvision.models.VisionTransformer:
    """ViT-B/16 for square RGB images whose side is a multiple of 16 (about 86M parameters).

    torchvision's attention keeps its query/key/value projection in
    `nn.MultiheadAttention.in_proj_weight` / `in_proj_bias`, not in an `nn.Linear`, so a
    conversion that only replaces Conv2d/Linear parameters leaves those deterministic.
    Input: (batch, 3, image_size, image_size); output: (batch, num_classes) logits.
    """
    if in_channels != 3:
        raise UsageError(f"vit_b_16 takes 3 input channels, got in_channels={in_channels}")
    if image_size % PATCH_SIZE:
        raise UsageError(f"vit_b_16 needs image_size divisible by {PATCH_SIZE}, got {image_size}")
    return torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=num_classes)
