"""Command line: ``python -m pyro_gbnn.export RUN_DIR --out FILE [--precision fp32|int8]
[--index-coding raw|zstd|ans] [--stage STAGE] [--device auto|cpu|cuda|cuda:N]``.

Writes the model of a finished run as one safetensors file (see
:mod:`pyro_gbnn.model_file`) and prints its bytes, in total and per part, as JSON. Bad
input prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyro_gbnn.errors import UsageError
from pyro_gbnn.index_coding import INDEX_CODINGS
from pyro_gbnn.model_file import PRECISIONS, export_model

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_gbnn.export", description="Write the model of a finished run as one safetensors file."
    )
    parser.add_argument("run_dir", help="folder of a finished run (holds checkpoint.pt)")
    parser.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="value tensors as fp32 or int8 codes")
    parser.add_argument(
        "--index-coding", default="zstd", choices=INDEX_CODINGS, help="2DGBNN index: raw, zstd (default) or ans"
    )
    parser.add_argument("--stage", help="export the model after this stage (default: the run's last)")
    parser.add_argument("--data-dir", help="where the data set is now, if it moved since the run")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sizes = export_model(
            args.run_dir, args.out, args.precision, args.index_coding, args.stage, args.data_dir, args.device
        )
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
