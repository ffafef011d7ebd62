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


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    pyro.set_rng_seed(0)
    torch.set_num_threads(2)
    yield
