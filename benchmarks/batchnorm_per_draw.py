"""A finished run's Bayesian stages scored with the BatchNorm running statistics and with
statistics re-estimated per posterior draw, over several evaluation seeds, side by side.

    python benchmarks/batchnorm_per_draw.py runs/c10-budget --stages mean_field fine_tune --seeds 5 \
        --out benchmarks/results/batchnorm-per-draw.json

For each stage and each ``predict.batchnorm`` mode the run's own test evaluation is
repeated with ``predict.evaluation_seeds`` seeds (``FitRun.evaluate`` with ``repeat`` =
0..seeds-1, ``predict.num_samples`` draws each): the mean and [min, max] of accuracy, NLL
and ECE, and each seed's row. Evaluation only: nothing is trained, the run folder is read.
Prints the JSON and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyro_gbnn.batchnorm import BATCHNORM_MODES
from pyro_gbnn.metrics import mean_and_spread
from pyro_gbnn.pipeline import model_after_stage, open_run

KEYS = ("accuracy", "nll", "ece", "brier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--stages", nargs="+", default=["mean_field"], help="stages with a guide to score")
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds per mode (default 5)")
    parser.add_argument("--samples", type=int, help="posterior draws (default: the run's predict.num_samples)")
    parser.add_argument("--batchnorm-batches", type=int, help="training batches per draw (default: predict.batchnorm_batches)")
    parser.add_argument("--data-dir", help="where the data set is now, if it moved")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args()

    run = open_run(args.run, args.data_dir)
    samples = args.samples or run.config["predict"]["num_samples"]
    if args.batchnorm_batches:
        run.config["predict"]["batchnorm_batches"] = args.batchnorm_batches
    result = {"run": str(args.run), "num_samples": samples, "seeds": args.seeds,
              "batchnorm_batches": run.config["predict"]["batchnorm_batches"], "stages": {}}
    for stage in args.stages:
        bnn, guide = model_after_stage(run, stage)
        rows = {"recorded": {k: run.results[stage][k] for k in KEYS if k in run.results[stage]}}
        for mode in BATCHNORM_MODES:
            run.config["predict"]["batchnorm"] = mode
            started = time.perf_counter()
            per_seed = [run.evaluate(bnn, guide, "test", samples, repeat) for repeat in range(args.seeds)]
            summary = mean_and_spread(per_seed) if len(per_seed) > 1 else {**per_seed[0], "spread": {}}
            rows[mode] = {
                **{k: summary[k] for k in KEYS},
                "range": {k: summary["spread"].get(k) for k in KEYS},
                "per_seed": [{k: row[k] for k in KEYS} for row in per_seed],
                "seconds": round(time.perf_counter() - started, 1),
            }
        result["stages"][stage] = rows
        print(json.dumps({stage: {m: {k: rows[m][k] for k in ("accuracy", "nll", "ece", "range")} for m in BATCHNORM_MODES}}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
