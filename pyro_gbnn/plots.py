"""Pictures of a run: the (mu, sigma) plane of a sharing plan (paper figures 2 and 3),
per-class confidence (figure 2, right), training curves and predictive entropy in and out
of distribution.

Every function draws on a given Axes or on a new pyplot-free Figure (safe under Agg, in
threads and in notebooks) and returns the Axes; ``save_figure`` writes a PNG. The
reliability diagram lives in :mod:`pyro_gbnn.metrics`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from torch import Tensor

from pyro_gbnn.sharing.plan import SharingPlan

__all__ = [
    "sharing_plane",
    "merging_side_by_side",
    "class_confidence",
    "training_curves",
    "entropy_histograms",
    "save_figure",
]


def _axes(ax: Axes | None, size: tuple[float, float] = (6.0, 4.5)) -> Axes:
    return ax if ax is not None else Figure(figsize=size).add_subplot()


def save_figure(ax: Axes, path: str | Path) -> Path:
    """Write the Axes' figure as a PNG (150 dpi, tight) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cast(Figure, ax.figure).savefig(path, dpi=150, bbox_inches="tight")
    return path


def _ellipses(means: np.ndarray, covs: np.ndarray, n_sigma: float, ax: Axes, **style) -> None:
    """n-sigma ellipses of 2D Gaussians as one collection (thousands draw at once)."""
    values, vectors = np.linalg.eigh(covs)
    widths = 2 * n_sigma * np.sqrt(np.clip(values[:, 1], 0, None))
    heights = 2 * n_sigma * np.sqrt(np.clip(values[:, 0], 0, None))
    angles = np.degrees(np.arctan2(vectors[:, 1, 1], vectors[:, 0, 1]))
    ax.add_collection(
        EllipseCollection(widths, heights, angles, units="xy", offsets=means, offset_transform=ax.transData, **style)
    )


def sharing_plane(
    loc: Tensor,
    scale: Tensor,
    plan: SharingPlan,
    ax: Axes | None = None,
    max_points: int = 20_000,
    max_ellipses: int = 150,
    seed: int = 0,
) -> Axes:
    """Every weight's (mean, std) with the plan's roles, and the components' 1- and
    2-sigma ellipses: inliers grey, outliers red, ellipse weights yellow, centres blue.

    Args:
        loc, scale: the weights' stage-1 means and stds, flat in site order (what stage 2
            clustered; e.g. ``torch.cat`` of ``MeanFieldGuide.posterior_moments()``).
        plan: the :class:`SharingPlan` built from them.
        max_points: inliers drawn at most (a random subset); outliers and ellipse
            weights are drawn up to the same number each.
        max_ellipses: components whose ellipses are drawn (a random subset; thousands
            would cover the cloud); every centre is drawn.
    """
    if loc.numel() != plan.num_weights or scale.numel() != plan.num_weights:
        raise ValueError(
            f"loc and scale must hold the plan's {plan.num_weights} weights, got {loc.numel()} and {scale.numel()}"
        )
    ax = _axes(ax)
    generator = torch.Generator().manual_seed(seed)
    loc, scale = loc.detach().reshape(-1).cpu(), scale.detach().reshape(-1).cpu()
    for index, colour, label, size in (
        (plan.inlier_index, "0.6", "inliers", 2),
        (plan.outlier_index, "tab:red", "outliers", 4),
        (plan.ellipse_index, "gold", "ellipse weights", 8),
    ):
        index = index.long()
        if index.numel() > max_points:
            index = index[torch.randperm(index.numel(), generator=generator)[:max_points]]
        ax.scatter(loc[index], scale[index], s=size, c=colour, label=f"{label} ({_count(plan, label)})", linewidths=0)
    means, covs = plan.means.double().numpy(), plan.covs.double().numpy()
    shown = torch.randperm(len(means), generator=generator)[:max_ellipses].numpy()
    ax.scatter(means[:, 0], means[:, 1], s=3, c="tab:blue", label=f"centres ({plan.num_components})", linewidths=0)
    _ellipses(means[shown], covs[shown], 1.0, ax, facecolors="none", edgecolors="navy", linewidths=0.6)
    _ellipses(
        means[shown], covs[shown], 2.0, ax, facecolors="none", edgecolors="navy", linewidths=0.4, linestyles="dotted"
    )
    ax.set_xlabel("mean of a weight, mu")
    ax.set_ylabel("std of a weight, sigma")
    ax.set_title(f"stage 2: weights and shared 2D Gaussians ({min(max_ellipses, len(means))} with 1 and 2 sigma)")
    ax.legend(loc="upper right", fontsize="small", markerscale=3)
    return ax


def merging_side_by_side(loc: Tensor, scale: Tensor, plan: SharingPlan, max_ellipses: int = 150, seed: int = 0) -> Axes:
    """Two panels: the mixture after dissolving and before merging (with the weights it
    clustered), and the plan after merging (:func:`sharing_plane`). Returns the right Axes."""
    if plan.merged_from is None:
        raise ValueError(
            "the plan keeps no mixture from before merging (built with merge=false or by an older version)"
        )
    figure = Figure(figsize=(12.0, 4.5))
    left, right = figure.subplots(1, 2, sharex=True, sharey=True)
    inliers = torch.cat([plan.inlier_index, plan.ellipse_index]).long()
    generator = torch.Generator().manual_seed(seed)
    shown = inliers[torch.randperm(inliers.numel(), generator=generator)[:20_000]]
    left.scatter(loc.reshape(-1)[shown], scale.reshape(-1)[shown], s=2, c="0.6", linewidths=0)
    means, covs = plan.merged_from["means"].double().numpy(), plan.merged_from["covs"].double().numpy()
    pick = torch.randperm(len(means), generator=generator)[:max_ellipses].numpy()
    left.scatter(means[:, 0], means[:, 1], s=3, c="tab:blue", linewidths=0)
    _ellipses(means[pick], covs[pick], 1.0, left, facecolors="none", edgecolors="navy", linewidths=0.6)
    left.set_title(f"before merging: {len(means)} components")
    left.set_xlabel("mean of a weight, mu")
    left.set_ylabel("std of a weight, sigma")
    sharing_plane(loc, scale, plan, ax=right, max_ellipses=max_ellipses, seed=seed)
    right.set_title(f"after merging: {plan.num_components} components")
    return right


def _count(plan: SharingPlan, label: str) -> int:
    index = {"inliers": plan.inlier_index, "outliers": plan.outlier_index, "ellipse weights": plan.ellipse_index}[label]
    return int(index.numel())


def class_confidence(
    probs: Tensor, labels: Tensor, class_names: list[str] | None = None, ax: Axes | None = None
) -> Axes:
    """Box plots of the predictive confidence (top-1 probability) per true class, with the
    mean above each box (paper figure 2, right). probs [N, C], labels [N]."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need probs [N, C] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    n_classes = probs.shape[1]
    names = class_names or [str(c) for c in range(n_classes)]
    ax = _axes(ax, (max(6.0, 0.6 * n_classes), 4.0))
    confidence = probs.max(-1).values.cpu().numpy()
    classes = labels.cpu().numpy()
    groups = [confidence[classes == c] for c in range(n_classes)]
    ax.boxplot([g if g.size else [math.nan] for g in groups], showfliers=False)
    ax.set_xticks(range(1, n_classes + 1), names, rotation=45 if n_classes > 10 or max(map(len, names)) > 3 else 0)
    for position, group in enumerate(groups, start=1):
        if group.size:
            ax.text(position, 1.02, f"{group.mean():.2f}", ha="center", va="bottom", fontsize="x-small")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("true class")
    ax.set_ylabel("confidence (top-1 probability)")
    return ax


def training_curves(records: list[dict], ax: Axes | None = None) -> Axes:
    """Training loss (left axis, log scale) and evaluation accuracy (right axis) per epoch,
    stage after stage, from the records of a run's ``log.jsonl``."""
    ax = _axes(ax, (7.0, 4.0))
    epochs = [r for r in records if "epoch" in r and "loss" in r]
    if not epochs:
        raise ValueError("no epoch records (with 'epoch' and 'loss') to draw")
    x = np.arange(1, len(epochs) + 1)
    stages = [r["stage"] for r in epochs]
    for stage in dict.fromkeys(stages):  # one line per stage: their losses hold different KL terms
        at = [i for i, s in enumerate(stages) if s == stage]
        ax.plot(x[at], [epochs[i]["loss"] for i in at], "o-", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("epoch, over all stages")
    ax.set_ylabel("training loss per example (circles)")
    right = ax.twinx()
    evaluated = [(i, r["eval"]["accuracy"]) for i, r in zip(x, epochs) if "eval" in r]
    if evaluated:
        right.plot(*zip(*evaluated), "s--", color="tab:orange")
    right.set_ylabel("evaluation accuracy (squares)")
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(x[i] - 0.5, color="0.7", linewidth=0.8)
    ax.set_xlim(0.5, len(x) + 0.5)
    for stage in dict.fromkeys(stages):
        first = stages.index(stage)
        ax.text(x[first] - 0.45, 0.98, stage, transform=ax.get_xaxis_transform(), va="top", fontsize="x-small")
    return ax


def entropy_histograms(
    probs_in: Tensor,
    probs_out: Tensor,
    names: tuple[str, str] = ("in-distribution", "out-of-distribution"),
    ax: Axes | None = None,
) -> Axes:
    """Histograms of the predictive entropy (nats) of two sets of predictions [N, C]: a BNN
    that knows what it does not know puts the out-of-distribution set to the right."""
    from pyro_gbnn.metrics import predictive_entropy

    ax = _axes(ax)
    top = math.log(probs_in.shape[1])
    bins = np.linspace(0, top, 31).tolist()
    for probs, name, colour in ((probs_in, names[0], "tab:blue"), (probs_out, names[1], "tab:red")):
        ax.hist(predictive_entropy(probs).cpu().numpy(), bins=bins, alpha=0.6, color=colour, label=name, density=True)
    ax.set_xlabel(f"predictive entropy (nats; log C = {top:.2f})")
    ax.set_ylabel("density")
    ax.legend()
    return ax
