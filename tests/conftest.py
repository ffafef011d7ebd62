"""Shared fixtures: tiny data sets written by the tests themselves."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (MNIST's format): magic with dtype code 0x08 (uint8), dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """An easy, learnable MNIST look-alike: class c lights up a bar at row 2c plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 3 : 2 * c + 6, 4:24] = 255
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    return root


def write_fake_svhn(root: Path, n: int = 20, seed: int = 0) -> Path:
    """SVHN's test file as torchvision stores it: ``SVHN/test_32x32.mat`` with X uint8
    [32, 32, 3, N] and y [N, 1] in 1..10 (10 is the digit 0). Returns the file."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    path = root / "SVHN" / "test_32x32.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1), dtype=np.uint8)})
    return path


def write_fake_cifar10c(root: Path, per_severity: int = 6, seed: int = 0) -> Path:
    """CIFAR-10-C's layout: ``CIFAR-10-C/<corruption>.npy`` uint8 [5 x N, 32, 32, 3] (severity
    1 first) and ``labels.npy``; each image's pixels hold its severity x 40 + its row in
    the severity block, so a test can tell which rows were read. Returns the folder."""
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    severity = np.repeat(np.arange(1, 6), per_severity)
    row = np.tile(np.arange(per_severity), 5)
    images = np.broadcast_to((severity * 40 + row).astype(np.uint8)[:, None, None, None], (5 * per_severity, 32, 32, 3))
    for name in ("gaussian_noise", "gaussian_blur", "contrast", "jpeg_compression"):
        np.save(folder / f"{name}.npy", np.ascontiguousarray(images))
    np.save(folder / "labels.npy", (row % 10).astype(np.uint8))
    return folder


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    pyro.set_rng_seed(0)
    torch.set_num_threads(2)
    yield


# ---------------------------------------------------------------------------------------
# Run configurations and helpers shared by the test modules (import them from tests.conftest)

TINY = [
    "model=mlp",
    "progress=false",
    "data.batch_size=64",
    "data.eval_batch_size=128",
    "deterministic.epochs=2",
    "deterministic.optimizer=adam",
    "deterministic.lr=0.003",
    "deterministic.weight_decay=0",
    "mean_field.epochs=2",
    "mean_field.eval_samples=2",
    "predict.num_samples=4",
]
"""A run that trains in seconds on the fake MNIST: an MLP, two short epochs per stage."""

GBNN = [
    "fine_tune.epochs=1",
    "fine_tune.lr=0.001",
    "sharing.num_components=16",
    "sharing.min_cluster_size=5",
    "sharing.gmm_max_epochs=10",
    "sharing.grad_batches=2",
]

SPIKE_SLAB = ["spike_slab.epochs=2", "spike_slab.eval_samples=2", "spike_slab.prior_inclusion=0.1"]
SSVI = ["ssvi.epochs=2", "ssvi.eval_samples=2", "ssvi.density=0.2", "ssvi.update_every=2", "ssvi.kl_warmup_epochs=1"]
INT8 = ["int8.scale_bits=[8, 4, 2, 1]"]


def tiny_config(data_dir, method="mean-field", extra=()):
    """The defaults with :data:`TINY`, the data folder, the method and ``extra`` overrides."""
    from pyro_gbnn.config import DEFAULTS, apply_overrides

    return apply_overrides(DEFAULTS, [*TINY, f"data.dir={data_dir}", f"method={method}", *extra])


class Killed(BaseException):
    pass


def kill_then_resume(config, out, monkeypatch, kill_after_saves):
    """Run until the k-th checkpoint is written, die there, then resume in the same folder."""
    from pyro_gbnn import pipeline, stages

    original_save = stages.FitRun.save
    calls = {"n": 0}

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == kill_after_saves:
            raise Killed()

    monkeypatch.setattr(stages.FitRun, "save", save_then_die)
    with pytest.raises(Killed):
        pipeline.run_fit(config, out)
    monkeypatch.setattr(stages.FitRun, "save", original_save)
    return pipeline.run_fit(config, out, resume=True)


def run_cli(args, capsys):
    from pyro_gbnn.fit import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()
