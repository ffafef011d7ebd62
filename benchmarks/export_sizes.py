"""Bytes of each export option of one 2DGBNN run, beside its mean-field network in fp32 and INT8.

    python -m pyro_gbnn.fit --config configs/mnist_quick_2dgbnn.yaml --data-dir ../shared/data --out runs/g
    python benchmarks/export_sizes.py runs/g --out runs/g-files

Writes every file into ``--out`` and prints one JSON object: per file its bytes (whole
file, header, network, posterior, index) and the test metrics of the *loaded* file
(accuracy, NLL, ECE, with the run's ``predict.num_samples`` draws and seed 0). The
mean-field rows are the run's stage-1 posterior: fp32, and ``int8`` (the INT8 method at
8/8 bits per output channel). The 2DGBNN rows cross precision (fp32, int8) with index
coding (raw, zstd, ans); files that differ only in index coding hold the same model
(tests/test_export.py checks that decoding is exact), so each precision is evaluated once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro

from pyro_gbnn.model_file import export_model, load_model
from pyro_gbnn.index_coding import INDEX_CODINGS
from pyro_gbnn.pipeline import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished 2dgbnn run")
    parser.add_argument("--out", required=True, help="folder for the model files")
    parser.add_argument("--data-dir", help="where the data set is now, if it moved since the run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = open_run(args.run_dir, args.data_dir)
    samples = run.config["predict"]["num_samples"]
    files = {("mean_field", "fp32", "raw"): "mean-field-fp32", ("mean_field", "int8", "raw"): "mean-field-int8"}
    for precision in ("fp32", "int8"):
        for coding in INDEX_CODINGS:
            files[("fine_tune", precision, coding)] = f"2dgbnn-{precision}-{coding}"
    rows, metrics = {}, {}
    for (stage, precision, coding), name in files.items():
        path = out / f"{name}.safetensors"
        sizes = export_model(args.run_dir, path, precision, coding, stage, args.data_dir)
        if (stage, precision) not in metrics:
            model = load_model(path)
            pyro.set_rng_seed(0)
            metrics[(stage, precision)] = run.evaluate(model.network, model.guide, "test", samples)
        rows[name] = {**sizes, **{k: metrics[(stage, precision)][k] for k in ("accuracy", "nll", "ece")}}
    print(json.dumps({"run": str(args.run_dir), "num_samples": samples, "files": rows}, indent=2))


if __name__ == "__main__":
    main()
