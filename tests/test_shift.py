"""Corrupted and out-of-distribution test sets: seeded, stronger with severity, shaped for the model."""

import pytest
import torch

from pyro_gbnn.data import ImageTensorDataset
from pyro_gbnn.errors import UsageError
from pyro_gbnn.shift import CORRUPTIONS, corrupt, corrupted_test_set, mnist_as_cifar


def smooth_images(n=6, seed=0):
    """Images with structure (blur and JPEG change little on pure noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 200 + 20).round().to(torch.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_keeps_shape_and_type_and_grows_with_severity(name):
    images = smooth_images()
    distances = []
    for severity in range(1, 6):
        out = corrupt(images, name, severity, seed=3)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        distances.append((out.float() - images.float()).pow(2).mean().sqrt().item())
    assert distances[0] > 0
    assert distances[4] > distances[0] and all(b >= a - 0.5 for a, b in zip(distances, distances[1:])), distances


def test_noise_is_seeded_and_has_the_stated_strength():
    images = torch.full((50, 3, 32, 32), 128, dtype=torch.uint8)
    a, b = corrupt(images, "gaussian_noise", 5, seed=1), corrupt(images, "gaussian_noise", 5, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, corrupt(images, "gaussian_noise", 5, seed=2))
    std = (a.float() / 255).std().item()  # severity 5: std 0.10 on [0, 1] pixels (no clipping at mid-grey)
    assert std == pytest.approx(0.10, rel=0.03)


def test_contrast_scales_distances_from_the_mean_by_its_factor():
    images = torch.tensor([[[[100, 200]]]], dtype=torch.uint8).expand(1, 3, 1, 2).contiguous()
    out = corrupt(images, "contrast", 1).float()  # factor 0.75 around the grey mean 150
    assert out[0, 0, 0].tolist() == pytest.approx([112.5, 187.5], abs=1)


def test_bad_corruption_arguments_are_one_line_errors():
    images = smooth_images(1)
    with pytest.raises(UsageError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)
    with pytest.raises(UsageError, match="severity must be 1..5, got 0"):
        corrupt(images, "jpeg", 0)
    with pytest.raises(UsageError, match="images must be uint8"):
        corrupt(images.float(), "jpeg", 1)
    with pytest.raises(UsageError, match=r"MNIST images must be uint8 \[N, 1, 28, 28\]"):
        mnist_as_cifar(images)


def test_mnist_digits_become_padded_three_channel_images():
    digits = torch.randint(1, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = mnist_as_cifar(digits)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 1, 2:30, 2:30], digits[:, 0]) and torch.equal(out[:, 0], out[:, 2])
    assert out[:, :, :2].sum() == 0 and out[:, :, :, 30:].sum() == 0


def test_corrupted_test_set_keeps_labels_and_the_evaluation_transform():
    images, labels = smooth_images(5), torch.arange(5)
    transform = lambda x: x.float() / 255  # noqa: E731
    test = ImageTensorDataset(images, labels, transform, indices=torch.tensor([4, 0, 2]))
    shifted = corrupted_test_set(test, "gaussian_blur", 3)
    assert len(shifted) == 3 and shifted.targets.tolist() == [4, 0, 2]
    x, y = shifted[0]
    assert y == 4 and x.dtype == torch.float32
    assert torch.equal(x, transform(corrupt(images[4:5], "gaussian_blur", 3)[0]))
