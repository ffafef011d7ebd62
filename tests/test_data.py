"""Loading, splitting and reproducible batching in `pyro_gbnn.data`, on tiny data sets written here."""

import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pyro_gbnn.data as data
from pyro_gbnn.data import DATASETS, ImageTensorDataset, augmentation_seed, load_dataset, make_loader, set_loader_epoch
from pyro_gbnn.errors import UsageError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- fake data writers


def pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 images in [10, 245], so zero padding is distinguishable from image content."""
    return np.random.default_rng(seed).integers(10, 246, size=(n, *shape), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file as in LeCun's MNIST: magic 0x0000 08 <ndim> (uint8), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": pixels(n_train, (28, 28), 0),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": pixels(n_test, (28, 28), 1),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py as torchvision reads it: pickled dicts, rows of 3072 = R, G, B planes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        x = pixels(n, (3072,), 10 + k)
        y = [int(v) for v in (np.arange(n) + k) % 10]
        with open(folder / name, "wb") as f:
            names = [f"{i}.png" for i in range(n)]
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": names}, f)
        if name != "test_batch":
            images.append(x)
            labels += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return np.concatenate(images).reshape(-1, 3, 32, 32), np.array(labels)


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 20), ("test", n_test, 21)):
        fine = [int(v) for v in (np.arange(n) * 7) % 100]
        coarse = [v // 5 for v in fine]
        entry = {"data": pixels(n, (3072,), seed), "fine_labels": fine, "coarse_labels": coarse}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        fine_names, coarse_names = [f"c{i:02d}" for i in range(100)], [f"s{i}" for i in range(20)]
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = pixels(1, (height, width, 3), seed)[0]
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(array).save(path, **options)


def write_cifar10_jpeg(root: Path, per_class: int = 3) -> Path:
    folder = root / "cifar10-jpeg"
    for split, n in (("train", per_class), ("test", 1)):
        for c, name in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                seed = 100 * c + i + (50 if split == "test" else 0)
                write_image(folder / split / name / f"{i:04d}.jpg", 32, 32, seed)
    return folder


def write_image_folder(root: Path, test_name: str = "val") -> None:
    sizes = [(40, 50), (64, 48), (300, 260)]
    for split, n in (("train", 3), (test_name, 1)):
        for c, cls in enumerate(["ant", "bee", "cat"]):
            for i in range(n):
                height, width = sizes[(c + i) % len(sizes)]
                suffix = ".png" if i == 1 else ".jpg"
                write_image(root / split / cls / f"{i}{suffix}", height, width, 7 * c + i)


@pytest.fixture
def fake_cifar_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision read the tiny fake CIFAR files.

    torchvision compares every CIFAR file with the MD5 sum of the published 170 MB
    original, which no tiny file can match. `check_integrity(path, md5=None)` checks only
    that the file exists, so we set the expected sums to None on torchvision's class
    attributes for this test (monkeypatch restores them). Everything else on the path is
    torchvision's own reader and the library's code, unchanged; the library keeps the
    check for users' real files (see test_cifar_checksum_mismatch_is_usage_error).
    """
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def normalised(raw: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return (raw.float() / 255 - mean) / std


def all_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    pairs = zip(a, b)
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


# --------------------------------------------------------------------------- names and MNIST


def test_unknown_name_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown dataset 'svhn'; choose one of mnist, cifar10, cifar100, imagenet"):
        load_dataset("svhn", tmp_path)
    assert DATASETS == ("mnist", "cifar10", "cifar100", "imagenet", "imagefolder")


def test_mnist(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    splits = load_dataset("mnist", tmp_path)
    assert (len(splits.train), len(splits.test), splits.val) == (20, 10, None)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert len(splits.classes) == 10
    x, y = splits.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).unsqueeze(0)
    torch.testing.assert_close(x, normalised(raw, (MNIST_MEAN,), (MNIST_STD,)))
    # MNIST is never augmented: a loader item equals the plain normalised image.
    xb, yb = next(iter(make_loader(splits.train, 20, shuffle=False)))
    torch.testing.assert_close(xb[3], x)
    assert yb.dtype == torch.int64 and yb.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert splits.test[1][1] == 3


def test_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"MNIST not found: looked for .*MNIST.raw.*--data-dir.*--download"):
        load_dataset("mnist", tmp_path)


def test_mnist_malformed(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:500])
    with pytest.raises(UsageError, match="MNIST files in .* are malformed"):
        load_dataset("mnist", tmp_path)
    images.write_bytes(b"\x12\x34\x56\x78" * 4)
    with pytest.raises(UsageError, match="malformed"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- CIFAR, pickled


def test_cifar10_pickled(tmp_path: Path, fake_cifar_checksums: None) -> None:
    images, labels = write_cifar10(tmp_path)
    splits = load_dataset("cifar10", tmp_path)
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert splits.classes == CIFAR10_CLASSES
    assert isinstance(splits.train, ImageTensorDataset)
    # Rows are R, G, B planes of 1024 pixels; the tensor must keep that [C, H, W] order.
    assert torch.equal(splits.train.images, torch.from_numpy(images))
    assert splits.train.targets.tolist() == labels.tolist()
    x, y = splits.test[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    torch.testing.assert_close(x, normalised(splits.test.images[4], CIFAR10_MEAN, CIFAR10_STD))

    expected = torch.stack([normalised(img, CIFAR10_MEAN, CIFAR10_STD) for img in splits.train.images])
    xb, _ = next(iter(make_loader(splits.train, 40, shuffle=False)))
    changed = [not torch.allclose(a, b) for a, b in zip(xb, expected)]
    assert sum(changed) > 20  # crop offset (0, 0) without a flip has chance 1/162 per item
    # Zero padding (constant mode) shows up as the value of a black pixel.
    black = normalised(torch.zeros(3, 1, 1, dtype=torch.uint8), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.isclose(xb, black.unsqueeze(0).expand_as(xb)).any()
    xt, _ = next(iter(make_loader(splits.test, 10, shuffle=False)))
    expected_test = torch.stack([normalised(img, CIFAR10_MEAN, CIFAR10_STD) for img in splits.test.images])
    torch.testing.assert_close(xt, expected_test)

    plain = load_dataset("cifar10", tmp_path, augment=False)
    xp, _ = next(iter(make_loader(plain.train, 40, shuffle=False)))
    torch.testing.assert_close(xp, expected)


def test_cifar100_pickled_uses_reflect_padding(tmp_path: Path, fake_cifar_checksums: None) -> None:
    write_cifar100(tmp_path)
    splits = load_dataset("cifar100", tmp_path)
    assert (len(splits.train), len(splits.test), splits.num_classes, splits.image_size) == (30, 10, 100, 32)
    assert splits.classes[:2] == ["c00", "c01"]
    assert splits.train.targets.tolist() == [(i * 7) % 100 for i in range(30)]
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)
    torch.testing.assert_close(splits.test[0][0], normalised(splits.test.images[0], mean, std))
    xb, _ = next(iter(make_loader(splits.train, 30, shuffle=False)))
    assert xb.shape == (30, 3, 32, 32)
    # Reflect padding, cropping and flipping only move pixels: every augmented value is a
    # value of the same image and channel (zero padding would add black pixels).
    plain = load_dataset("cifar100", tmp_path, augment=False).train
    for i, aug in enumerate(xb):
        ref = plain[i][0]
        for c in range(3):
            assert torch.isin(aug[c].flatten(), ref[c].flatten()).all()
    assert sum(not torch.equal(a, plain[i][0]) for i, a in enumerate(xb)) > 15


def test_cifar_checksum_mismatch_is_usage_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(UsageError, match="cifar10 in .*cifar-10-batches-py .*MD5"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickled_garbage_is_usage_error(tmp_path: Path, fake_cifar_checksums: None) -> None:
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="cifar100 files in .* are malformed"):
        load_dataset("cifar100", tmp_path)


@pytest.mark.parametrize(
    "name, folders",
    [("cifar10", "cifar-10-batches-py.*cifar10-jpeg"), ("cifar100", "cifar-100-python.*cifar100-jpeg")],
)
def test_cifar_missing(tmp_path: Path, name: str, folders: str) -> None:
    with pytest.raises(UsageError, match=f"{name} not found: looked for .*{folders}.*--data-dir.*--download"):
        load_dataset(name, tmp_path)


# --------------------------------------------------------------------------- CIFAR, JPEG copy and its cache


def test_cifar10_jpeg_and_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_cifar10_jpeg(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", tmp_path / "data", cache_dir=cache, augment=False)
    assert (len(first.train), len(first.test), first.num_classes) == (30, 10, 10)
    assert first.classes == CIFAR10_CLASSES
    assert first.train.images.dtype == torch.uint8 and first.train.images.shape == (30, 3, 32, 32)
    assert first.train.targets.tolist() == [c for c in range(10) for _ in range(3)]
    written = np.asarray(Image.open(folder / "train" / "bird" / "0001.jpg").convert("RGB"))
    diff = first.train.images[7].permute(1, 2, 0).int() - torch.tensor(written).int()
    assert diff.abs().max() <= 2  # two JPEG decoders may round differently
    files = sorted(cache.glob("*.pt"))
    assert [f.name.rsplit("-", 1)[0] for f in files] == ["cifar10-jpeg-test", "cifar10-jpeg-train"]

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is fresh")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode_image", no_decoding)
        second = load_dataset("cifar10", tmp_path / "data", cache_dir=cache, augment=False)
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.targets, first.test.targets)

    for f in files:
        f.write_bytes(b"corrupt" * 10)
    with pytest.warns(UserWarning, match="unreadable decode cache"):
        third = load_dataset("cifar10", tmp_path / "data", cache_dir=cache, augment=False)
    assert torch.equal(third.train.images, first.train.images)
    assert all(torch.load(f, weights_only=True)["images"].dtype == torch.uint8 for f in files)
    assert not list(cache.glob("*.tmp"))

    # A changed folder makes the cache stale: it is rebuilt, not trusted.
    write_image(folder / "train" / "cat" / "0099.jpg", 32, 32, 999)
    fourth = load_dataset("cifar10", tmp_path / "data", cache_dir=cache)
    assert len(fourth.train) == 31 and fourth.train.targets[12].item() == 3


def test_jpeg_cache_default_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_jpeg(tmp_path / "data", per_class=1)
    load_dataset("cifar10", tmp_path / "data")
    assert len(list((tmp_path / "data" / ".pyro_gbnn_cache").glob("*.pt"))) == 2

    # A cache_dir that cannot be created (its parent is a file) falls back to the user cache.
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    splits = load_dataset("cifar10", tmp_path / "data", cache_dir=tmp_path / "a_file" / "cache")
    assert len(splits.train) == 10
    assert len(list((tmp_path / "xdg" / "pyro_gbnn").glob("*.pt"))) == 2


def test_jpeg_cache_follows_the_environment_and_leaves_others_data_folders_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_jpeg(tmp_path / "data", per_class=1)
    monkeypatch.setenv("PYRO_GBNN_CACHE", str(tmp_path / "env-cache"))
    load_dataset("cifar10", tmp_path / "data")
    assert len(list((tmp_path / "env-cache").glob("*.pt"))) == 2
    monkeypatch.delenv("PYRO_GBNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # the data folder belongs to someone else
    load_dataset("cifar10", tmp_path / "data")
    assert len(list((tmp_path / "xdg" / "pyro_gbnn").glob("*.pt"))) == 2
    assert not (tmp_path / "data" / ".pyro_gbnn_cache").exists()


def test_cifar_jpeg_malformed(tmp_path: Path) -> None:
    folder = write_cifar10_jpeg(tmp_path, per_class=1)
    bad = folder / "train" / "dog" / "0000.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UsageError, match="cannot decode image .*0000.jpg"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    write_image(bad, 40, 32, 1)
    with pytest.raises(UsageError, match="is 32x40, expected 32x32"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    bad.unlink()
    with pytest.raises(UsageError, match=r"1 class folder\(s\) in .*train hold no images \(dog\)"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    os.rmdir(bad.parent)
    with pytest.raises(UsageError, match="has 9 class folders, expected 10"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- image folders


def test_imagefolder(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    splits = load_dataset("imagefolder", tmp_path)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (9, 3, 3)
    assert (splits.in_channels, splits.image_size, splits.classes) == (3, 224, ["ant", "bee", "cat"])
    assert splits.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = splits.test[2]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 2
    assert torch.equal(splits.test[2][0], x)  # evaluation is deterministic
    # Few augmented items: ColorJitter's hue step costs tens of ms per 224 x 224 image.
    xb, yb = next(iter(make_loader(splits.train, 2, shuffle=True)))
    assert xb.shape == (2, 3, 224, 224) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    plain = load_dataset("imagefolder", tmp_path, augment=False)
    first = make_loader(splits.train, 2, shuffle=False)
    assert not torch.allclose(next(iter(first))[0][0], plain.train[0][0])

    other = tmp_path / "other"
    write_image_folder(other, test_name="test")
    assert len(load_dataset("imagefolder", other).test) == 3


def test_imagefolder_files_are_checked_once_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated JPEG in val/ is named when the data set loads, not at the first evaluation;
    a listing that passed is not scanned again."""
    write_image_folder(tmp_path)
    bad = tmp_path / "val" / "bee" / "0.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(UsageError, match=r"1 of 12 image files under .* cannot be decoded, e.g. .*val/bee/0.jpg \(OSError: image file is truncated"):
        load_dataset("imagefolder", tmp_path)
    bad.write_bytes(good)
    load_dataset("imagefolder", tmp_path)

    checked = []
    original = data._check_image
    monkeypatch.setattr(data, "_check_image", lambda path: checked.append(path) or original(path))
    assert len(load_dataset("imagefolder", tmp_path).test) == 3
    assert checked == [], "a listing that passed is not scanned again"
    os.utime(bad, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed listing is checked again
    load_dataset("imagefolder", tmp_path)
    assert len(checked) == 12


def test_imagenet_accepts_imagenet_subfolder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imagenet")
    splits = load_dataset("imagenet", tmp_path, val_fraction=1 / 3, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    assert splits.val[0][0].shape == (3, 224, 224)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"imagenet not found: looked for .*train,val.*imagenet.*--data-dir"):
        load_dataset("imagenet", tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match="found .*train but neither .*val nor .*test"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(UsageError, match="no class folders in .*train"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "ant").mkdir()
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match=r"1 class folder\(s\) in .*train hold no images \(ant\)"):
        load_dataset("imagefolder", tmp_path)
    write_image(tmp_path / "train" / "ant" / "0.jpg", 30, 30, 0)
    write_image(tmp_path / "val" / "wasp" / "0.jpg", 30, 30, 0)
    with pytest.raises(UsageError, match="absent from the training set: wasp"):
        load_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------- split and loader


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path, fake_cifar_checksums: None) -> None:
    write_cifar10(tmp_path)
    a = load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=1)
    b = load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=1)
    c = load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=2)
    assert (len(a.train), len(a.val)) == (30, 10)
    assert torch.equal(a.val.indices, b.val.indices) and torch.equal(a.train.indices, b.train.indices)
    assert not torch.equal(a.val.indices, c.val.indices)
    assert set(a.val.indices.tolist()).isdisjoint(a.train.indices.tolist())
    assert sorted(a.val.indices.tolist() + a.train.indices.tolist()) == list(range(40))
    # Validation items are evaluated without augmentation.
    for i in range(len(a.val)):
        raw = a.val.images[a.val.indices[i]]
        torch.testing.assert_close(a.val[i][0], normalised(raw, CIFAR10_MEAN, CIFAR10_STD))
        assert a.val[i][1] == int(a.val.labels[a.val.indices[i]])
    for bad in (-0.1, 1.0):
        with pytest.raises(UsageError, match="val_fraction must be in"):
            load_dataset("cifar10", tmp_path, val_fraction=bad)


def test_loader_is_a_function_of_seed_and_epoch(tmp_path: Path, fake_cifar_checksums: None) -> None:
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path).train
    rng_before = torch.get_rng_state()
    loader = make_loader(train, 16, shuffle=True, seed=3, epoch=1)
    first = all_batches(loader)
    assert torch.equal(torch.get_rng_state(), rng_before)  # data loading leaves the model's RNG alone
    torch.manual_seed(12345)  # ...and does not depend on it
    assert same_batches(first, all_batches(make_loader(train, 16, shuffle=True, seed=3, epoch=1)))
    assert same_batches(first, all_batches(loader))  # iterating again repeats the epoch
    with_workers = make_loader(train, 16, shuffle=True, seed=3, epoch=1, num_workers=2)
    assert same_batches(first, all_batches(with_workers))
    assert [x.shape[0] for x, _ in first] == [16, 16, 8]
    assert [x.shape[0] for x, _ in make_loader(train, 16, shuffle=True, drop_last=True)] == [16, 16]

    other_epoch = all_batches(make_loader(train, 16, shuffle=True, seed=3, epoch=2))
    other_seed = all_batches(make_loader(train, 16, shuffle=True, seed=4, epoch=1))
    assert not torch.equal(first[0][1], other_epoch[0][1]) and not torch.equal(first[0][1], other_seed[0][1])
    # The same items in a fixed order are augmented differently in another epoch.
    fixed = [all_batches(make_loader(train, 40, shuffle=False, seed=3, epoch=e))[0][0] for e in (1, 1, 2)]
    assert torch.equal(fixed[0], fixed[1]) and not torch.equal(fixed[0], fixed[2])
    # One item alone can be reproduced from its documented seed.
    x, y = train.seeded_item(5, augmentation_seed(3, 2, 5))
    assert torch.equal(x, fixed[2][5]) and y == int(train.targets[5])


def test_a_persistent_loader_moved_from_epoch_to_epoch_gives_each_epochs_batches(tmp_path: Path, fake_cifar_checksums: None) -> None:
    """One loader whose two workers live across epochs (set_loader_epoch) gives, in every
    epoch, the batches of a fresh loader made for that epoch: permutation and augmentation."""
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path).train
    kept = make_loader(train, 16, shuffle=True, seed=3, epoch=0, num_workers=2, persistent_workers=True)
    assert kept.persistent_workers
    for epoch in (0, 1, 2, 1):
        fresh = all_batches(make_loader(train, 16, shuffle=True, seed=3, epoch=epoch))
        assert same_batches(fresh, all_batches(set_loader_epoch(kept, epoch))), epoch
    sharded = make_loader(train, 8, shuffle=True, seed=3, epoch=0, num_workers=2, num_replicas=2, rank=1, persistent_workers=True)
    fresh = all_batches(make_loader(train, 8, shuffle=True, seed=3, epoch=2, num_replicas=2, rank=1))
    assert same_batches(fresh, all_batches(set_loader_epoch(sharded, 2)))


def test_loader_argument_checks(tmp_path: Path, fake_cifar_checksums: None) -> None:
    write_cifar10(tmp_path)
    test = load_dataset("cifar10", tmp_path).test
    with pytest.raises(UsageError, match="batch_size must be a positive integer, got 0"):
        make_loader(test, 0, shuffle=False)
    plain = torch.utils.data.TensorDataset(torch.arange(6))
    assert [b[0].tolist() for b in make_loader(plain, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5]]


# --------------------------------------------------------------------------- the real data (slow)


@pytest.mark.real_data
def test_real_data(tmp_path: Path) -> None:
    if not (REAL_DATA / "MNIST").is_dir() or not (REAL_DATA / "cifar10-jpeg").is_dir():
        pytest.skip(f"no shared data at {REAL_DATA}")
    mnist = load_dataset("mnist", REAL_DATA)
    assert (len(mnist.train), len(mnist.test), mnist.num_classes) == (60000, 10000, 10)
    assert torch.bincount(mnist.test.targets).tolist()[:2] == [980, 1135]

    # The cache goes to tmp_path so that the shared folder is never written to.
    start = time.perf_counter()
    cold = load_dataset("cifar10", REAL_DATA, cache_dir=tmp_path)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = load_dataset("cifar10", REAL_DATA, cache_dir=tmp_path)
    cached_s = time.perf_counter() - start
    print(f"\nCIFAR-10 JPEG: decode {decode_s:.1f} s, cached reload {cached_s:.1f} s")
    assert (len(warm.train), len(warm.test), warm.classes) == (50000, 10000, CIFAR10_CLASSES)
    assert torch.equal(warm.train.images, cold.train.images)
    assert torch.bincount(warm.train.targets).tolist() == [5000] * 10
    assert torch.bincount(warm.test.targets).tolist() == [1000] * 10
    mean = warm.train.images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor(CIFAR10_MEAN), atol=0.01, rtol=0)
