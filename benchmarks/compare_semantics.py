"""Stages 2 and 3 of 2DGBNN under each sampling semantics, from one finished stage 1.

    python -m pyro_gbnn.fit --config configs/cifar10_resnet20_budget.yaml \
        --data-dir ../shared/data --out runs/c10-budget
    python benchmarks/compare_semantics.py runs/c10-budget --out runs/c10-semantics

Every semantics starts from the same checkpoint (stage 0 and stage 1 as the base run
left them, and the random state at the end of stage 1, so the base run's own semantics
reproduces its stages 2 and 3 exactly; checkpoints written before ``stage_rng`` existed
give every branch the base run's last random state instead), so the rows differ only in
the guide. Each variant is
an ordinary run folder resumed by ``run_fit``: kill this script and start it again, and
it continues where it stopped. Prints one JSON object with the stage-1 row and, per
semantics, the rows of stages 2 and 3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_gbnn.checkpoint import load_checkpoint
from pyro_gbnn.guides.shared_mixture import SEMANTICS
from pyro_gbnn.pipeline import branch_run, run_fit

ROW_KEYS = (
    "accuracy", "nll", "ece", "n_params_trainable", "n_params_paper", "size_bytes", "size_bytes_index",
    "n_outliers", "n_ellipses", "n_gaussians", "wall_time_s",
)


def row(result: dict) -> dict:
    return {key: result[key] for key in ROW_KEYS if key in result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="run folder of a 2dgbnn run whose stage 1 has finished")
    parser.add_argument("--out", type=Path, required=True, help="folder for one run per semantics")
    parser.add_argument("--semantics", nargs="+", default=list(SEMANTICS), choices=SEMANTICS)
    parser.add_argument("--data-dir", help="where the data set is now, if it moved")
    args = parser.parse_args()

    base = load_checkpoint(args.base / "checkpoint.pt")
    if "mean_field" not in base["results"]:
        raise SystemExit(f"{args.base} has no finished stage 1 yet; let its run reach stage 2 first")
    report = {"base": str(args.base), "stage1": row(base["results"]["mean_field"]), "semantics": {}}
    for semantics in args.semantics:
        out = args.out / semantics
        config = branch_run(args.base, out, "mean_field", [f"fine_tune.semantics={semantics}"])
        metrics = run_fit(config, out, resume=True, progress=False, data_dir=args.data_dir)
        report["semantics"][semantics] = {stage: row(metrics["stages"][stage]) for stage in ("sharing", "fine_tune")}
        print(json.dumps({semantics: report["semantics"][semantics]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
