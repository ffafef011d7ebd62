"""Test sets under distribution shift, made on the fly from the test images themselves.

CIFAR-10-C-style corruptions (Hendrycks & Dietterich 2019) at severities 1-5 with
torchvision's transforms, on the uint8 images the model's evaluation transform then
normalises, and MNIST digits as out-of-distribution inputs for a CIFAR model (padded to
32x32, repeated to 3 channels). Noise is seeded: a corrupted set is the same on every run.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from pyro_gbnn.data import ImageTensorDataset
from pyro_gbnn.errors import UsageError

__all__ = ["CORRUPTIONS", "corrupt", "corrupted_test_set", "mnist_as_cifar"]

# Severity 1..5 parameters of CIFAR-10-C (the authors' released code, CIFAR variants).
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std on [0, 1] pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` (uint8 [N, C, H, W]) under corruption ``name`` at ``severity`` (1-5), uint8."""
    if name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption {name!r}; use one of {', '.join(CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise UsageError(f"severity must be 1..5, got {severity!r}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    level = CORRUPTIONS[name][severity - 1]
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * level
        return ((images.float() / 255 + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    if name == "gaussian_blur":
        kernel = 2 * int(torch.tensor(3 * level).ceil()) + 1  # +-3 sigma
        return F.gaussian_blur(images, [kernel, kernel], [level, level])
    if name == "contrast":
        return F.adjust_contrast(images, level)
    return torch.stack([_jpeg(image, int(level)) for image in images])


def _jpeg(image: Tensor, quality: int) -> Tensor:
    """One uint8 [C, H, W] image through a JPEG round trip at ``quality`` (PIL, as CIFAR-10-C made it)."""
    channels_last = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(channels_last[..., 0] if image.shape[0] == 1 else channels_last).save(buffer, "JPEG", quality=quality)
    decoded = torch.from_numpy(np.array(Image.open(buffer)))
    return decoded.reshape(*decoded.shape[:2], -1).permute(2, 0, 1).contiguous()


def corrupted_test_set(test: ImageTensorDataset, name: str, severity: int, seed: int = 0) -> ImageTensorDataset:
    """``test`` (an in-memory test set, e.g. ``load_dataset(...).test``) with every image corrupted,
    through the same evaluation transform."""
    images = torch.stack([test.load(i)[0] for i in range(len(test))])
    return ImageTensorDataset(corrupt(images, name, severity, seed), test.targets.clone(), test.transform)


def mnist_as_cifar(images: Tensor) -> Tensor:
    """MNIST digits (uint8 [N, 1, 28, 28]) as CIFAR-shaped inputs: padded with 2 black pixels a
    side to 32x32 and repeated to 3 channels (uint8 [N, 3, 32, 32])."""
    if images.dtype != torch.uint8 or images.shape[1:] != (1, 28, 28):
        raise UsageError(f"MNIST images must be uint8 [N, 1, 28, 28], got {images.dtype} {list(images.shape)}")
    return torch.nn.functional.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
