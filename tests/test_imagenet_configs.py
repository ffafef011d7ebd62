"""The ImageNet configs as shipped, on a synthetic ImageFolder the test writes: only the
network's size, the epochs and the batch change (a ViT-tiny for ViT-B/16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyro_gbnn.config import apply_overrides, load_config
from pyro_gbnn.pipeline import run_fit

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, classes: int = 3, per_class: dict[str, int] | None = None) -> Path:
    """JPEGs of assorted sizes in ``train/`` and ``val/``: each class a colour plus noise."""
    rng = np.random.default_rng(0)
    per_class = per_class or {"train": 8, "val": 4}
    for split, n in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                height, width = (int(v) for v in rng.integers(40, 90, size=2))
                colour = np.zeros(3)
                colour[c % 3] = 200
                pixels = np.clip(colour + rng.normal(0, 30, size=(height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


SMALL = [
    "progress=false", "data.batch_size=8", "data.eval_batch_size=12", "data.num_workers=2",
    "deterministic.epochs=1", "deterministic.warmup_epochs=0", "mean_field.epochs=1", "fine_tune.epochs=1",
    "mean_field.eval_samples=2", "fine_tune.eval_samples=2", "predict.num_samples=2", "sharing.grad_batches=2",
]


@pytest.mark.integration
def test_vit_tiny_runs_every_stage_of_the_imagenet_vit_config(tmp_path):
    """ViT-B/16's config with a 1-layer, 32-wide ViT (16x16 patches of the 224x224 crops
    the ImageNet transforms make): stages 0-3 with the shipped stage-2 settings (K = 6000)."""
    data = write_image_folder(tmp_path / "imagenet")
    config = load_config(ROOT / "configs" / "imagenet_vit_b16.yaml")
    config = apply_overrides(config, [
        *SMALL, "model=vit", f"data.dir={data}",
        "model_args={patch_size: 16, num_layers: 1, num_heads: 2, hidden_dim: 32, mlp_dim: 64}",
    ])
    metrics = run_fit(config, tmp_path / "run")
    assert set(metrics["stages"]) == {"deterministic", "mean_field", "sharing", "fine_tune"}
    assert metrics["n_gaussians"] >= 1
    assert metrics["n_params_trainable"] < metrics["stages"]["mean_field"]["n_params_trainable"]
