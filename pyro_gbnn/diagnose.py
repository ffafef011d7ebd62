"""Command line: ``python -m pyro_gbnn.diagnose RUN_DIR`` draws the pictures of a finished run.

Writes into ``RUN_DIR/diagnostics/``: ``reliability.png`` (accuracy per confidence bin,
ECE), ``class_confidence.png`` (confidence per true class), ``training_curves.png`` (loss
and evaluation accuracy per epoch, all stages), ``entropy_ood.png`` (predictive entropy of
test images and of the same images with their pixels shuffled), for 2DGBNN runs
``sharing_plane.png`` (the stage-1 (mu, sigma) of every weight with the plan's roles and
components) and ``merging.png`` (the mixture before and after merging), and
``summary.md`` (the run's table, the test metrics of these predictions, the Pareto k-hat
of the variational fit where the guide has a density over the weights, PSIS-LOO and the
out-of-distribution AUROC). A run trained with ``--tracker`` gets the pictures and the
summary in its TensorBoard folder or MLflow run too. ``--device`` (default ``auto``: the
GPU when there is one) is where the model is rebuilt, whatever device the run trained on.
Bad input prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyro_gbnn.errors import UsageError

__all__ = ["main", "diagnose_run"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyro_gbnn.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="folder of a finished run (holds checkpoint.pt)")
    parser.add_argument("--data-dir", help="where the data set is now, if it moved since the run")
    parser.add_argument(
        "--samples", type=int, help="posterior draws per test image (default: the run's predict.num_samples)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    return parser


def diagnose_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    samples: int | None = None,
    device: str | torch.device | None = "auto",
) -> list[Path]:
    """Write the pictures and ``summary.md`` of a finished run, its model rebuilt on ``device``
    (``auto``: the GPU when there is one, whatever the run trained on); returns the written paths."""
    from pyro_gbnn.data import sample_examples
    from pyro_gbnn.metrics import classification_metrics, ood_metrics, reliability_diagram
    from pyro_gbnn.pipeline import model_after_stage, open_run
    from pyro_gbnn.plots import (
        class_confidence,
        entropy_histograms,
        merging_side_by_side,
        save_figure,
        sharing_plane,
        training_curves,
    )
    from pyro_gbnn.predict import predict
    from pyro_gbnn.report import format_table
    from pyro_gbnn.sharing.plan import SharingPlan
    from pyro_gbnn.tracking import open_tracker

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise UsageError(f"{str(run_dir)!r} holds no checkpoint.pt; pass the --out folder of a pyro_gbnn.fit run")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    run = open_run(run_dir, data_dir, device)
    network, guide = model_after_stage(run)
    out = run_dir / "diagnostics"
    torch.manual_seed(run.config["seed"])
    num_samples = 1 if guide is None else samples or run.config["predict"]["num_samples"]
    draws = run.fixed_draws(network, guide, num_samples)  # per-draw BatchNorm statistics, or None
    prediction = predict(
        network,
        guide,
        run.loader("test"),
        num_samples=num_samples,
        sample_chunk=run.config["predict"]["sample_chunk"],
        draws=draws,
    )
    bins = run.config["predict"]["ece_bins"]
    classes = run.data.classes
    written = [
        save_figure(reliability_diagram(prediction.probs, prediction.labels, bins), out / "reliability.png"),
        save_figure(class_confidence(prediction.probs, prediction.labels, classes), out / "class_confidence.png"),
    ]
    log = run_dir / "log.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        written.append(save_figure(training_curves(records), out / "training_curves.png"))
    if "sharing" in run.outputs:
        plan = SharingPlan.from_state(run.outputs["sharing"]["plan"])
        _, stage1 = model_after_stage(run, "mean_field")
        moments = stage1.posterior_moments()  # on run.device; the plan and the plots are on the CPU
        loc = torch.cat([moments[n][0].detach().reshape(-1).cpu() for n in plan.site_names])
        scale = torch.cat([moments[n][1].detach().reshape(-1).cpu() for n in plan.site_names])
        written.append(save_figure(sharing_plane(loc, scale, plan), out / "sharing_plane.png"))
        if plan.merged_from is not None:
            written.append(save_figure(merging_side_by_side(loc, scale, plan), out / "merging.png"))
    x, y = sample_examples(run.data.test, 1000, run.config["seed"])
    shuffled = _pixel_shuffled(x, run.config["seed"])
    predict_chunk = dict(num_samples=num_samples, sample_chunk=run.config["predict"]["sample_chunk"], draws=draws)
    probs_in = predict(network, guide, [(x, y)], **predict_chunk).probs
    probs_out = predict(network, guide, [(shuffled, y)], **predict_chunk).probs
    names = ("test images", "the same, pixels shuffled")
    written.append(save_figure(entropy_histograms(probs_in, probs_out, names), out / "entropy_ood.png"))
    ood = ood_metrics(probs_in, probs_out)
    metrics = classification_metrics(prediction.probs, prediction.labels, bins)
    fit = _variational_fit(run, network, guide, num_samples, (x, y)) if guide is not None else []
    fit.append(
        f"- Out of distribution ({len(y)} test images against the same with their pixels shuffled by one "
        f"fixed permutation): predictive-entropy AUROC {ood['entropy_auroc']:.3f}, FPR at 95% TPR "
        f"{ood['entropy_fpr95']:.3f}"
    )
    summary = out / "summary.md"
    summary.write_text(
        f"# {run.config['method']} on {run.config['dataset']} ({run.config['model']})\n\n"
        f"```\n{format_table({'stages': run.results})}\n```\n\n"
        f"Test predictions drawn here ({num_samples} posterior draws per image"
        + (", each with its own BatchNorm statistics" if draws is not None else "")
        + "): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + "\n\n"
        + "".join(f"{line}\n" for line in fit)
        + "\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in written)
    )
    tracker = open_tracker(run.config["tracker"], run_dir, run.config)
    try:  # the run's tracker (if any) gets the pictures and the summary too
        for path in written:
            tracker.figure(f"diagnostics/{path.stem}", path)
        tracker.text("diagnostics_summary", summary.read_text())
    finally:
        tracker.close()
    return [*written, summary]


def _pixel_shuffled(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Images [N, C, H, W] with their pixel positions permuted, one permutation for all: the
    intensities stay, the shapes go. An out-of-distribution set that needs no other data."""
    n, c, h, w = x.shape
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return x.reshape(n, c, h * w)[:, :, order].reshape(n, c, h, w)


def _variational_fit(
    run, network, guide, num_samples: int, test: tuple[torch.Tensor, torch.Tensor], examples: int = 1000
) -> list[str]:
    """Lines for summary.md: Pareto k-hat of q on ``examples`` training examples (a seeded
    random subset), PSIS-LOO on the ``test`` subset the pictures used."""
    from pyro_gbnn.arviz_compat import loo as psis_loo
    from pyro_gbnn.data import sample_examples
    from pyro_gbnn.diagnostics import khat_reading, to_inference_data, variational_khat

    lines = []
    examples_here = sample_examples(run.data.train, examples, run.config["seed"])
    x, y = (t.to(run.device) for t in examples_here)  # the network's device
    try:
        khat, _ = variational_khat(network, guide, x, y, num_samples=max(num_samples, 100))
        lines.append(
            f"- Pareto k-hat of p(w, D) / q(w) ({len(y)} training examples scaled to the data set): {khat:.2f}, "
            f"{khat_reading(khat)}"
        )
    except UsageError as err:
        lines.append(f"- Pareto k-hat: not defined here ({err})")
    x, y = (t.to(run.device) for t in test)
    batchnorm = run.batchnorm_batches() if run.per_draw_batchnorm(network, guide) else None
    idata = to_inference_data(
        guide,
        num_samples=max(num_samples, 100),
        bnn=network,
        data=(x, y),  # PSIS needs draws
        batchnorm_batches=batchnorm,
    )
    loo = psis_loo(idata)
    bad = int((loo.pareto_k > 0.7).sum())
    lines.append(
        f"- PSIS-LOO on {len(y)} test examples: elpd_loo {loo.elpd:.1f} (SE {loo.se:.1f}), p_loo {loo.p:.1f}, {bad} "
        "points with k > 0.7"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = diagnose_run(args.run_dir, args.data_dir, args.samples, args.device)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
