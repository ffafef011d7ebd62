"""Test sets under distribution shift and out-of-distribution sets for CIFAR models.

Corruptions: the real CIFAR-10-C (Hendrycks & Dietterich 2019; ``CIFAR-10-C/<name>.npy``
and ``labels.npy`` in the data folder) when present, else CIFAR-10-C-style corruptions
made on the fly with torchvision's transforms on the uint8 test images, at the CIFAR-10-C
parameters (seeded: a corrupted set is the same on every run). Out-of-distribution
inputs: MNIST digits (padded to 32x32, repeated to 3 channels) and the SVHN test set
(``test_32x32.mat``, torchvision's layout; ``download=True`` fetches it through torchvision).
Every set goes through the model's evaluation transform.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from pyro_gbnn.data import ImageTensorDataset
from pyro_gbnn.errors import UsageError

__all__ = [
    "CIFAR10C_FILES",
    "CORRUPTIONS",
    "cifar10c_folder",
    "cifar10c_test_set",
    "corrupt",
    "corrupted_test_set",
    "digits_as_cifar_test_set",
    "mnist_as_cifar",
    "svhn_test_set",
]

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
    Image.fromarray(channels_last[..., 0] if image.shape[0] == 1 else channels_last).save(
        buffer, "JPEG", quality=quality
    )
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


def digits_as_cifar_test_set(
    mnist_test: ImageTensorDataset, transform, count: int | None = None, seed: int = 0
) -> ImageTensorDataset:
    """``count`` MNIST test digits (a seeded random choice; all of them for None) as an
    out-of-distribution set for a CIFAR model: :func:`mnist_as_cifar` through the CIFAR
    evaluation ``transform``, every label 0."""
    picked = torch.randperm(len(mnist_test), generator=torch.Generator().manual_seed(seed))[:count]
    digits = torch.stack([mnist_test.load(int(i))[0] for i in picked])
    return ImageTensorDataset(mnist_as_cifar(digits), torch.zeros(len(digits), dtype=torch.int64), transform)


# Our corruption names -> the CIFAR-10-C file that holds them.
CIFAR10C_FILES = {
    "gaussian_noise": "gaussian_noise",
    "gaussian_blur": "gaussian_blur",
    "contrast": "contrast",
    "jpeg": "jpeg_compression",
}
_SEVERITIES = 5


def cifar10c_folder(data_dir: str | Path) -> Path | None:
    """``<data_dir>/CIFAR-10-C`` if it holds CIFAR-10-C's ``labels.npy``, else None (use the made corruptions)."""
    folder = Path(data_dir) / "CIFAR-10-C"
    return folder if (folder / "labels.npy").is_file() else None


def cifar10c_test_set(
    folder: str | Path,
    name: str,
    severity: int,
    transform: Callable[[Tensor], Tensor],
    count: int | None = None,
    seed: int = 0,
) -> ImageTensorDataset:
    """Corruption ``name`` at ``severity`` from the real CIFAR-10-C in ``folder``: ``count``
    of its images (a seeded random choice; all for None) with CIFAR-10-C's own labels (its
    images follow the original CIFAR-10 test order, which a copy of the test set in another
    order cannot index, so the subset is drawn from CIFAR-10-C itself)."""
    if name not in CIFAR10C_FILES:
        raise UsageError(f"unknown corruption {name!r}; use one of {', '.join(CIFAR10C_FILES)}")
    if severity not in range(1, _SEVERITIES + 1):
        raise UsageError(f"severity must be 1..5, got {severity!r}")
    path = Path(folder) / f"{CIFAR10C_FILES[name]}.npy"
    if not path.is_file():
        raise UsageError(
            f"{str(path)!r} does not exist; put CIFAR-10-C's {path.name} there, or remove the folder to use made "
            "corruptions"
        )
    images, labels = np.load(path, mmap_mode="r"), np.load(Path(folder) / "labels.npy")
    per_severity = len(images) // _SEVERITIES
    if (
        images.ndim != 4
        or images.shape[1:] != (32, 32, 3)
        or images.dtype != np.uint8
        or len(labels) != len(images)
        or len(images) != _SEVERITIES * per_severity
    ):
        raise UsageError(
            f"{str(path)!r} is not a CIFAR-10-C array (uint8 [5 x N, 32, 32, 3] with as many labels), "
            f"got {images.dtype} {list(images.shape)} and {len(labels)} labels"
        )
    picked = torch.randperm(per_severity, generator=torch.Generator().manual_seed(seed))[:count].sort().values.numpy()
    rows = (severity - 1) * per_severity + picked
    block = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(block, torch.from_numpy(labels[rows].astype(np.int64)), transform)


def svhn_test_set(
    data_dir: str | Path,
    transform: Callable[[Tensor], Tensor],
    count: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> ImageTensorDataset | None:
    """``count`` SVHN test images (a seeded random choice; all for None) as an
    out-of-distribution set for a CIFAR model, read from ``<data_dir>/SVHN/test_32x32.mat``
    (torchvision's file); None when it is not there and ``download`` is off. ``download``
    fetches it through ``torchvision.datasets.SVHN``. Labels are SVHN's digits (10 -> 0)."""
    folder = Path(data_dir) / "SVHN"
    path = folder / "test_32x32.mat"
    if not path.is_file():
        if not download:
            return None
        import torchvision

        torchvision.datasets.SVHN(root=str(folder), split="test", download=True)
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
        images, labels = mat["X"], mat["y"].reshape(-1).astype(np.int64) % 10
    except (MatReadError, ValueError, KeyError, OSError) as err:
        raise UsageError(f"{str(path)!r} is not SVHN's test_32x32.mat ({err}); delete it and pass --download") from None
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise UsageError(
            f"{str(path)!r} is not SVHN's test_32x32.mat (X must be [32, 32, 3, N]), got {list(images.shape)}"
        )
    picked = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count].numpy()
    block = torch.from_numpy(np.ascontiguousarray(images[..., picked].transpose(3, 2, 0, 1))).to(torch.uint8)
    return ImageTensorDataset(block, torch.from_numpy(labels[picked]), transform)
