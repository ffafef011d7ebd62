"""Corrupted and out-of-distribution test sets: seeded, stronger with severity, shaped for the model."""

import numpy as np
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


def test_the_real_cifar10c_is_read_by_severity_with_its_own_labels(tmp_path):
    from pyro_gbnn.shift import cifar10c_folder, cifar10c_test_set
    from tests.conftest import write_fake_cifar10c

    assert cifar10c_folder(tmp_path) is None, "no CIFAR-10-C: the made corruptions are used"
    folder = write_fake_cifar10c(tmp_path, per_severity=6)
    assert cifar10c_folder(tmp_path) == folder
    every = cifar10c_test_set(folder, "jpeg", 3, lambda x: x)
    rows = [int(every.load(i)[0][0, 0, 0]) - 3 * 40 for i in range(len(every))]
    assert rows == list(range(6)) and every.load(0)[0].shape == (3, 32, 32)
    assert every.targets.tolist() == [r % 10 for r in rows]
    some = cifar10c_test_set(folder, "gaussian_noise", 5, lambda x: x, count=4, seed=1)
    picked = [int(some.load(i)[0][0, 0, 0]) - 5 * 40 for i in range(4)]
    assert len(set(picked)) == 4 and all(0 <= r < 6 for r in picked)
    assert picked == [int(cifar10c_test_set(folder, "gaussian_noise", 5, lambda x: x, 4, 1).load(i)[0][0, 0, 0]) - 200 for i in range(4)]
    with pytest.raises(UsageError, match="severity must be 1..5"):
        cifar10c_test_set(folder, "jpeg", 6, lambda x: x)
    np.save(folder / "contrast.npy", np.zeros((7, 32, 32), dtype=np.uint8))
    with pytest.raises(UsageError, match="is not a CIFAR-10-C array"):
        cifar10c_test_set(folder, "contrast", 1, lambda x: x)
    (folder / "gaussian_blur.npy").unlink()
    with pytest.raises(UsageError, match="does not exist"):
        cifar10c_test_set(folder, "gaussian_blur", 1, lambda x: x)


def test_svhn_is_read_from_torchvisions_file_when_present(tmp_path):
    from scipy.io import loadmat

    from pyro_gbnn.shift import svhn_test_set
    from tests.conftest import write_fake_svhn

    assert svhn_test_set(tmp_path, lambda x: x) is None, "absent and no download: no SVHN set"
    path = write_fake_svhn(tmp_path, n=20)
    mat = loadmat(path)
    svhn = svhn_test_set(tmp_path, lambda x: x)
    assert len(svhn) == 20
    image, label = svhn.load(0)
    index = int(torch.randperm(20, generator=torch.Generator().manual_seed(0))[0])
    assert torch.equal(image, torch.from_numpy(mat["X"][..., index].transpose(2, 0, 1).copy()))
    assert label == int(mat["y"][index, 0]) % 10
    assert len(svhn_test_set(tmp_path, lambda x: x, count=5)) == 5
    path.write_bytes(b"not a mat file")
    with pytest.raises(UsageError, match="is not SVHN's test_32x32.mat"):
        svhn_test_set(tmp_path, lambda x: x)
