"""Command line: ``python -m pyro_gbnn.predict MODEL_FILE --images PATH... [--samples S] [--seed N] [--json]``.

Prints, per image (a file, or every image in a folder), the predicted class, its
probability, the predictive entropy and the mutual information (nats) under a model file
written by ``python -m pyro_gbnn.export``; ``--json`` prints one JSON object per image with
every class probability; ``--device`` (default ``auto``: the GPU when there is one) is where
the model runs. The same numbers for tensors:
:func:`pyro_gbnn.predict.predictive_summary` (or ``load_model(path).predict(x)``).
Bad input prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro
import torch

from pyro_gbnn.errors import UsageError

__all__ = ["main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_paths(paths: list[str]) -> list[Path]:
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UsageError(
                    f"folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass image files or another folder"
                )
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"image {name!r} does not exist; pass image files or folders of images")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyro_gbnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("model_file", help="a file written by python -m pyro_gbnn.export")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument(
        "--samples", type=int, help="posterior draws per image (default: the run's predict.num_samples)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the posterior draws (default 0; a file with per-draw BatchNorm statistics has its own draws)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per image, with every class probability"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pyro_gbnn.data import image_for_model
    from pyro_gbnn.model_file import load_model

    args = _parser().parse_args(argv)
    try:
        if args.samples is not None and args.samples < 1:
            raise UsageError(f"--samples must be >= 1, got {args.samples}")
        model = load_model(args.model_file, device=args.device)
        info = model.info
        paths = _image_paths(args.images)
        x = torch.stack([image_for_model(p, info["dataset"], info["in_channels"], info["image_size"]) for p in paths])
        pyro.set_rng_seed(args.seed)
        summary = model.predict(x, args.samples)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    classes = info["classes"]
    for i, path in enumerate(paths):
        k = int(summary.predicted[i])
        row = {
            "image": str(path),
            "class": classes[k],
            "label": k,
            "probability": round(float(summary.probs[i, k]), 6),
            "entropy": round(float(summary.entropy[i]), 6),
            "mutual_information": round(float(summary.mutual_information[i]), 6),
        }
        if args.json:
            print(json.dumps({**row, "probs": [round(float(p), 6) for p in summary.probs[i]]}))
        else:
            print(
                f"{row['image']}\t{row['class']}\tp={row['probability']:.4f}\tentropy={row['entropy']:.4f}\tMI={row['mutual_information']:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
