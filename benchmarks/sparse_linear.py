"""When does SSVI's CSR Linear kernel beat the dense one? One layer, forward + backward.

For Linear shapes of the library's networks, a batch of 128 and each density, times a
training step of one layer (forward, backward to the active values and the input) with the
dense kernel (the active values scattered into a dense weight, ``F.linear`` or the dense
estimator) and with :func:`pyro_gbnn.sparse.sparse_linear`, for every estimator; the two
variants of a cell are timed interleaved. Prints JSON (``--out`` writes it too); the
``ssvi.sparse_kernel_max_density`` default is read off this table.

    python benchmarks/sparse_linear.py --out benchmarks/results/sparse-linear.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyro_gbnn.bayesian import BayesianNetwork  # noqa: E402
from pyro_gbnn.elbo import AnalyticKL_ELBO  # noqa: E402
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide  # noqa: E402
from pyro_gbnn.likelihoods import Categorical  # noqa: E402
from pyro_gbnn.priors import IIDNormalPrior  # noqa: E402

SHAPES = {"lenet_fc1": (1024, 256), "mlp_400": (400, 400), "vit_s_mlp": (384, 1536)}
DENSITIES = (1.0, 0.3, 0.1, 0.05, 0.02, 0.01)


def step_time_ms(in_features: int, out_features: int, density: float, estimator: str, sparse: bool,
                 batch: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    bnn = BayesianNetwork(torch.nn.Linear(in_features, out_features, bias=False), IIDNormalPrior(), Categorical(1),
                          estimator=estimator)
    guide = SparseSubspaceGuide(bnn, density, addition="random", sparse_kernel_max_density=1.0 if sparse else 0.0)
    elbo = AnalyticKL_ELBO(bnn, guide)
    x = torch.randn(batch, in_features, requires_grad=True)
    y = torch.randint(0, out_features, (batch,))
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        elbo(x, y).backward()
        times.append((time.perf_counter() - start) * 1000)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = []
    for shape_name, (n_in, n_out) in SHAPES.items():
        for estimator in ("weight", "local", "flipout"):
            for density in DENSITIES:
                dense, sparse = [], []
                for _ in range(3):  # interleaved rounds
                    dense += step_time_ms(n_in, n_out, density, estimator, False, args.batch, args.repeats // 3)
                    sparse += step_time_ms(n_in, n_out, density, estimator, True, args.batch, args.repeats // 3)
                cell = {"layer": shape_name, "in": n_in, "out": n_out, "estimator": estimator, "density": density,
                        "dense_ms": round(statistics.median(dense), 3), "sparse_ms": round(statistics.median(sparse), 3)}
                cell["sparse_over_dense"] = round(cell["sparse_ms"] / cell["dense_ms"], 3)
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
    report = {"batch": args.batch, "threads": args.threads, "torch": torch.__version__, "cells": cells,
              "sparse_faster_at_or_below": {
                  f"{c['layer']}/{c['estimator']}": max((d["density"] for d in cells if d["layer"] == c["layer"]
                                                          and d["estimator"] == c["estimator"] and d["sparse_over_dense"] < 1),
                                                         default=None)
                  for c in cells}}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
