"""A finished run's Bayesian stages scored with the BatchNorm running statistics and with
statistics re-estimated per posterior draw, over several evaluation seeds, side by side.

    python benchmarks/batchnorm_per_draw.py runs/c10-budget --stages mean_field fine_tune --seeds 5 \
        --out benchmarks/results/batchnorm-per-draw.json

For each stage and each ``predict.batchnorm`` mode the run's own test evaluation is
repeated with ``predict.evaluation_seeds`` seeds (``FitRun.evaluate`` with ``repeat`` =
0..seeds-1, ``predict.num_samples`` draws each): the mean and [min, max] of accuracy, NLL
and ECE, and each seed's row. Evaluation only: nothing is trained, the run folder is read.
Prints the JSON and writes it to ``--out``.

For a CIFAR run with MNIST beside it in the data folder, each mode also tells
``--ood-examples`` MNIST test digits (padded to 32x32, 3 channels) from as many CIFAR test
images by predictive entropy and by mutual information (AUROC, AUPR, FPR at 95% TPR; the
first evaluation seed's draws), and the deterministic stage is scored as the reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_gbnn.batchnorm import BATCHNORM_MODES
from pyro_gbnn.data import load_dataset, make_loader
from pyro_gbnn.errors import UsageError
from pyro_gbnn.metrics import mean_and_spread, ood_metrics
from pyro_gbnn.pipeline import model_after_stage, open_run
from pyro_gbnn.stages import FitRun
from pyro_gbnn.predict import predict
from pyro_gbnn.shift import digits_as_cifar_test_set

KEYS = ("accuracy", "nll", "ece", "brier")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--stages", nargs="+", default=["mean_field"], help="stages with a guide to score")
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds per mode (default 5)")
    parser.add_argument("--samples", type=int, help="posterior draws (default: the run's predict.num_samples)")
    parser.add_argument("--batchnorm-batches", type=int, help="training batches per draw (default: predict.batchnorm_batches)")
    parser.add_argument("--data-dir", help="where the data set is now, if it moved")
    parser.add_argument("--modes", nargs="+", choices=BATCHNORM_MODES, default=list(BATCHNORM_MODES), help="modes to score (default: both)")
    parser.add_argument("--ood-examples", type=int, default=2000, help="CIFAR test images and MNIST digits for OOD (0: none)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)

    run = open_run(args.run, args.data_dir)
    samples = args.samples or run.config["predict"]["num_samples"]
    if args.batchnorm_batches:
        run.config["predict"]["batchnorm_batches"] = args.batchnorm_batches
    result = {"run": str(args.run), "num_samples": samples, "seeds": args.seeds,
              "batchnorm_batches": run.config["predict"]["batchnorm_batches"], "stages": {}}
    ood_sets = _ood_sets(run, args.data_dir, args.ood_examples)
    if ood_sets is not None:
        bnn, _ = model_after_stage(run, "deterministic")
        result["deterministic_ood_mnist"] = _ood(run, bnn, None, ood_sets, 1)
    for stage in args.stages:
        bnn, guide = model_after_stage(run, stage)
        rows = {"recorded": {k: run.results[stage][k] for k in KEYS if k in run.results[stage]}}
        for mode in args.modes:
            run.config["predict"]["batchnorm"] = mode
            started = time.perf_counter()
            per_seed = [run.evaluate(bnn, guide, "test", samples, repeat) for repeat in range(args.seeds)]
            summary = mean_and_spread(per_seed) if len(per_seed) > 1 else {**per_seed[0], "spread": {}}
            rows[mode] = {
                **{k: summary[k] for k in KEYS},
                **({"ood_mnist": _ood(run, bnn, guide, ood_sets, samples)} if ood_sets is not None else {}),
                "range": {k: summary["spread"].get(k) for k in KEYS},
                "per_seed": [{k: row[k] for k in KEYS} for row in per_seed],
                "seconds": round(time.perf_counter() - started, 1),
            }
        result["stages"][stage] = rows
        print(json.dumps({stage: {m: {k: rows[m][k] for k in ("accuracy", "nll", "ece", "range")} for m in args.modes}}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _ood_sets(run: FitRun, data_dir: str | None, count: int):
    """(CIFAR test subset, MNIST digits) of ``count`` images each, seed 0; None when the run
    is not a CIFAR run, ``count`` is 0 or MNIST is not in the data folder."""
    if count == 0 or not run.config["dataset"].startswith("cifar"):
        return None
    try:
        mnist = load_dataset("mnist", data_dir or run.config["data"]["dir"], augment=False)
    except UsageError as err:
        print(f"no OOD scores: {err}", flush=True)
        return None
    test = run.data.test
    clean = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:count], test.transform)
    return clean, digits_as_cifar_test_set(mnist.test, test.transform, count, seed=0)


def _ood(run: FitRun, bnn, guide, sets, samples: int) -> dict[str, float]:
    """OOD scores of one model and the run's ``predict.batchnorm`` mode (the draws of the first evaluation seed)."""
    size = run.config["data"]["eval_batch_size"]
    draws = run.fixed_draws(bnn, guide, samples) if guide is not None else None
    scored = []
    for dataset in sets:
        pyro.set_rng_seed(run.config["seed"])
        scored.append(predict(bnn, guide, make_loader(dataset, size, shuffle=False), num_samples=samples,
                              keep_samples=guide is not None, draws=draws))
    (clean, ood) = scored
    return ood_metrics(clean.probs, ood.probs, clean.sample_probs, ood.sample_probs)


if __name__ == "__main__":
    main()
