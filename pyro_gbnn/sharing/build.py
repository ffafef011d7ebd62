"""Stage 2 of 2DGBNN as one function: outliers, 2D mixture, dissolving, merging, blending.

Input: every Bayesian weight's (mean, std) from the stage-1 mean-field guide and its
accumulated gradient magnitude; output: a :class:`~pyro_gbnn.sharing.plan.SharingPlan`.
Each step is a plain tensor function of its own module, so each can be tested and
ablated alone (``tau_w=None``, ``top_grad_fraction=None``, ``merge=False``,
``blend=False``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from pyro_gbnn import distributed as _dist
from pyro_gbnn.errors import UsageError
from pyro_gbnn.sharing.blending import blend_weights, ellipse_mask, nearest_components
from pyro_gbnn.sharing.gmm import GMMResult, fit_gmm_2d, gmm_assign
from pyro_gbnn.sharing.merging import MergeResult, merge_components
from pyro_gbnn.sharing.outliers import dissolve_small_clusters, outlier_mask
from pyro_gbnn.sharing.plan import SharingPlan, index_dtype

__all__ = ["BLEND_RULES", "SharingSettings", "build_sharing_plan", "merge_with_settings"]


@dataclass
class SharingSettings:
    """Stage-2 settings: Table 14's K = 6000 and N_min = 20, section 4 and appendices E, H, I.5.

    Merging (see :mod:`pyro_gbnn.sharing.merging`): a pair merges when its squared W2
    distance is below ``merge_tau_overlap`` times its mean covariance trace (ours; the
    absolute ``merge_tau_w2sq`` of App. H, 1.5e-7, is off by default because it barely
    merges our posteriors), one is among the ``merge_neighbours`` nearest centres of the
    other, itself counted (the authors' ``topk``), the gradient step
    ``|grad| x merge_grad_lr`` at both centres is below ``merge_tau_grad_step``, and both
    pooled member variances are below ``merge_tau_var`` (the authors' tests);
    ``merge_rule`` says how a pair becomes one (``moments``: the members' mean and
    covariance). None switches a test off. ``blend_rule`` picks the ellipse weights
    (``every``: outside every component's ellipse; ``own``: outside their own, the
    authors' code). The mixture is fitted to at most ``gmm_max_points`` inliers, a seeded
    subset; every inlier is then assigned.
    """

    tau_w: float | None = 0.2
    top_grad_fraction: float | None = 0.01
    num_components: int = 6000
    min_cluster_size: int = 20
    merge: bool = True
    merge_rule: str = "moments"
    merge_tau_w2sq: float | None = None
    merge_tau_overlap: float | None = 1.0
    merge_neighbours: int | None = 3
    merge_tau_grad_step: float | None = 0.15
    merge_grad_lr: float = 1e-5
    merge_tau_var: float | None = 1e-3
    blend: bool = True
    blend_rule: str = "every"
    blend_k: int = 5
    mahalanobis_threshold: float = 5.991
    gmm_batch_size: int = 65536
    gmm_max_points: int | None = 2_000_000
    gmm_max_epochs: int = 100
    gmm_tol: float = 1e-4
    gmm_mode: str = "epoch"
    seed: int = 0

    def check(self) -> None:
        """One-line errors for settings that are each in range but cannot work together."""
        if self.blend_rule not in BLEND_RULES:
            raise UsageError(f"blend_rule {self.blend_rule!r} is unknown; use one of {BLEND_RULES}")
        if self.gmm_max_points is not None and self.gmm_max_points < self.num_components:
            raise UsageError(
                f"sharing.gmm_max_points ({self.gmm_max_points}) is below sharing.num_components "
                f"({self.num_components}): the mixture needs more fitted points than components; "
                "raise gmm_max_points or set it to null (all inliers)"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SharingSettings:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown sharing settings {sorted(unknown)}; accepted: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**values)


class _Flat(NamedTuple):
    """Every weight's mean, standard deviation and |gradient| as flat vectors, site by site."""

    names: list[str]
    shapes: list[list[int]]
    loc: torch.Tensor
    scale: torch.Tensor
    grad: torch.Tensor | None


def _flatten(moments: dict[str, tuple[torch.Tensor, torch.Tensor]], gradients: dict[str, torch.Tensor] | None) -> _Flat:
    """The flat vectors, on the device the moments are on (stage 2 runs where training ran)."""
    names = list(moments)
    loc = torch.cat([moments[n][0].reshape(-1) for n in names]).detach().float()
    scale = torch.cat([moments[n][1].reshape(-1) for n in names]).detach().float().to(loc.device)
    grad = None
    if gradients is not None:
        grad = torch.cat([gradients[n].reshape(-1) for n in names]).detach().float().to(loc.device).abs()
    shapes = [list(moments[n][0].shape) for n in names]
    return _Flat(names, shapes, loc, scale, grad)


def merge_with_settings(
    means: torch.Tensor,
    covs: torch.Tensor,
    counts: torch.Tensor,
    step_at_centres: torch.Tensor | None,
    settings: SharingSettings,
) -> MergeResult:
    """:func:`merge_components` with the ``merge_*`` tests and rule of ``settings``; the
    gradient test is skipped when ``step_at_centres`` (|grad| x merge_grad_lr) is None."""
    return merge_components(
        means,
        covs,
        counts,
        step_at_centres,
        settings.merge_tau_w2sq,
        tau_overlap=settings.merge_tau_overlap,
        neighbours=settings.merge_neighbours,
        tau_grad=settings.merge_tau_grad_step if step_at_centres is not None else None,
        tau_var=settings.merge_tau_var,
        rule=settings.merge_rule,
    )


BLEND_RULES = ("every", "own")
"""Which points are ellipse weights: outside ``every`` component's ellipse, or outside their ``own``."""


_POINTS_PER_PASS = 1 << 23
"""Inliers per chunk of a pass over all of them (assigning, ellipse tests): the sweep's
sorted copies and per-point work then cost O(chunk), not O(N) (memory only: every chunk
uses the same mixture)."""


def _points(flat: _Flat, positions: torch.Tensor) -> torch.Tensor:
    """[n, 2] float64 (mean, std) points of the weights at ``positions``.

    Stage 2 builds them chunk by chunk from the flat vectors instead of keeping all N
    (with the sweep's sorted copies of all N, that made stage 2 of an 86M-weight network
    peak at 12 GB).
    """
    return torch.stack([flat.loc[positions], flat.scale[positions]], -1).double()


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(start + _POINTS_PER_PASS, n)) for start in range(0, n, _POINTS_PER_PASS)]


def _assign_all(
    flat: _Flat,
    positions: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    batch_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n] long: each inlier's most responsible component, a chunk of inliers at a time
    (written into ``out`` when given)."""
    assign = torch.empty(positions.numel(), dtype=torch.long, device=positions.device) if out is None else out
    for chunk in _chunks(positions.numel()):
        assign[chunk] = gmm_assign(_points(flat, positions[chunk]), weights, means, covs, batch_size)[0]
    return assign


def _assign_to_ellipses(
    flat: _Flat,
    positions: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    assign: torch.Tensor,
    threshold: float,
    rule: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ellipse weights among the inliers at ``positions`` to blend (Eq. 7) under ``rule``.

    ``own`` (the authors' code): every point outside its own component's 95% ellipse.
    ``every``: a point outside its own ellipse but inside another's moves to the nearest
    (Mahalanobis) component (``assign`` is updated in place); only points outside every
    ellipse are blended.

    Returns:
        (assignments [N] long, ellipse [N] bool).
    """
    outside = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
    for chunk in _chunks(positions.numel()):
        outside[chunk] = ellipse_mask(_points(flat, positions[chunk]), means, covs, assign[chunk], threshold)
    if rule == "own":
        return assign, outside
    where = outside.nonzero().squeeze(-1)
    nearest, d2 = nearest_components(_points(flat, positions[where]), means, covs, 1)
    held = d2[:, 0] <= threshold
    assign[where[held]] = nearest[held, 0]
    ellipse = torch.zeros_like(outside)
    ellipse[where[~held]] = True
    return assign, ellipse


def _fitting_positions(positions: torch.Tensor, max_points: int | None, seed: int) -> torch.Tensor:
    """The weights the mixture is fitted to: all ``positions``, or a seeded uniform subset
    of ``max_points`` of them in their order (every inlier is still assigned to the fitted
    mixture afterwards).

    EM's cost grows with N while K components of 5 values each are pinned down by far
    fewer points: 2M points give ~330 per component at K = 6,000, and the fit's cost no
    longer grows with the network (benchmarks/sharing_scale.py).
    """
    if max_points is None or positions.numel() <= max_points:
        return positions
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(positions.numel(), generator=generator)[:max_points].sort().values
    return positions[pick.to(positions.device)]


def build_sharing_plan(
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
    gradients: dict[str, torch.Tensor] | None,
    settings: SharingSettings,
    distributed: bool = False,
) -> SharingPlan:
    """Run stage 2 on per-site (loc, scale) and gradient magnitudes; returns the plan.

    The plan's ``report`` records counts and timings of each step and the mixture's mean
    log-likelihood, so a run can be inspected without re-running it.

    ``distributed=True`` in a data-parallel run (every rank passes the same inputs): the
    mixture is fitted with each rank's share of the points (``fit_gmm_2d(distributed=True)``),
    the steps after it run on rank 0, and every rank returns rank 0's plan.
    """
    settings.check()
    started = time.perf_counter()
    flat = _flatten(moments, gradients)
    loc, grad = flat.loc, flat.grad
    n = loc.numel()
    outliers = outlier_mask(loc, grad, settings.tau_w, settings.top_grad_fraction)
    report: dict[str, Any] = {"settings": asdict(settings), "n_weights": n, "n_outliers_initial": int(outliers.sum())}

    inlier_pos = (~outliers).nonzero().squeeze(-1)
    k = min(settings.num_components, max(1, inlier_pos.numel()))
    t0 = time.perf_counter()
    fitted = _points(flat, _fitting_positions(inlier_pos, settings.gmm_max_points, settings.seed))
    start, stop = _dist.shard_range(fitted.shape[0]) if distributed else (0, fitted.shape[0])
    gmm = fit_gmm_2d(
        fitted[start:stop],
        k,
        batch_size=settings.gmm_batch_size,
        max_epochs=settings.gmm_max_epochs,
        tol=settings.gmm_tol,
        seed=settings.seed,
        mode=settings.gmm_mode,
        distributed=distributed,
    )
    report.update(
        gmm_time_s=time.perf_counter() - t0,
        gmm_points=int(fitted.shape[0]),
        gmm_mean_log_likelihood=gmm.mean_log_likelihood,
        gmm_epochs=gmm.n_iter,
        n_gaussians_initial=k,
    )
    del fitted
    plan: SharingPlan | None = None
    if not distributed or _dist.is_main():
        # Rebinding here lets the pre-dissolving positions go (hundreds of MB at ImageNet size).
        inlier_pos, assign, means, covs = _dissolve(flat, outliers, inlier_pos, gmm, settings, report)
        plan = _plan_from_mixture(flat, outliers, inlier_pos, assign, means, covs, settings, report, started)
        if not distributed:
            return plan
    shared = _dist.broadcast_object(plan.to("cpu") if plan is not None else None)  # rank 0's GPU is not every rank's
    return shared.to(loc.device)


def _dissolve(
    flat: _Flat,
    outliers: torch.Tensor,
    inlier_pos: torch.Tensor,
    gmm: GMMResult,
    settings: SharingSettings,
    report: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every inlier to its most responsible component, small clusters dissolved into
    outliers (``outliers`` is updated); returns the kept (positions, assignments) and the
    surviving components' (means, covariances)."""
    assign = _assign_all(flat, inlier_pos, gmm.weights, gmm.means, gmm.covs, settings.gmm_batch_size)
    keep, kept, remap = dissolve_small_clusters(assign, gmm.weights.shape[0], settings.min_cluster_size)
    report["n_gaussians_after_dissolving"] = int(kept.numel())
    if not bool(keep.all()):
        outliers[inlier_pos[~keep]] = True
        inlier_pos, assign = inlier_pos[keep], assign[keep]
    return inlier_pos, remap[assign], gmm.means[kept], gmm.covs[kept]


def _plan_from_mixture(
    flat: _Flat,
    outliers: torch.Tensor,
    inlier_pos: torch.Tensor,
    assign: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    settings: SharingSettings,
    report: dict[str, Any],
    started: float,
) -> SharingPlan:
    """Stage 2 after dissolving: merge, blend, and the plan. ``assign`` is reused (overwritten)
    rather than copied: at ImageNet size each copy of it is 8 bytes per weight."""
    loc, scale, grad = flat.loc, flat.scale, flat.grad
    counts = torch.bincount(assign, minlength=means.shape[0]).double()

    merged_from = None
    if settings.merge and means.shape[0] > 1:
        merged_from = {"means": means.float().clone(), "covs": covs.float().clone()}
        grad_sum = torch.zeros(means.shape[0], dtype=torch.float64, device=loc.device)
        if grad is not None:
            for chunk in _chunks(inlier_pos.numel()):
                grad_sum.index_add_(0, assign[chunk], grad[inlier_pos[chunk]].double())
        step_at_centres = grad_sum / counts.clamp_min(1) * settings.merge_grad_lr
        merged = merge_with_settings(means, covs, counts, step_at_centres if grad is not None else None, settings)
        means, covs, counts = merged.means, merged.covs, merged.weights
        report["merge_rounds"] = merged.rounds
        if merged.rounds:
            _assign_all(flat, inlier_pos, counts / counts.sum(), means, covs, settings.gmm_batch_size, out=assign)
            _, kept, remap = dissolve_small_clusters(assign, means.shape[0], 1)
            means, covs = means[kept], covs[kept]
            for chunk in _chunks(assign.numel()):
                assign[chunk] = remap[assign[chunk]]
    report["n_gaussians"] = int(means.shape[0])

    comp_dtype = index_dtype(means.shape[0])
    if settings.blend and means.shape[0] > 1:
        assign, ellipse = _assign_to_ellipses(
            flat, inlier_pos, means, covs, assign, settings.mahalanobis_threshold, settings.blend_rule
        )
        ell_comps, ell_alphas = blend_weights(_points(flat, inlier_pos[ellipse]), means, covs, settings.blend_k)
    else:
        ellipse = torch.zeros(inlier_pos.numel(), dtype=torch.bool, device=loc.device)
        ell_comps = torch.zeros(0, 1, dtype=torch.int64, device=loc.device)
        ell_alphas = torch.zeros(0, 1, device=loc.device)
    component = assign[~ellipse]
    counts = torch.bincount(component, minlength=means.shape[0]).double()
    counts = counts.index_add_(0, ell_comps.reshape(-1), ell_alphas.reshape(-1).double())
    component = component.to(comp_dtype)

    outlier_pos = outliers.nonzero().squeeze(-1)
    plan = SharingPlan(
        site_names=flat.names,
        site_shapes=flat.shapes,
        means=means.float(),
        covs=covs.float(),
        counts=counts.float(),
        outlier_index=outlier_pos,
        outlier_loc=loc[outlier_pos],
        outlier_scale=scale[outlier_pos],
        inlier_index=inlier_pos[~ellipse],
        inlier_component=component,
        ellipse_index=inlier_pos[ellipse],
        ellipse_components=ell_comps.to(comp_dtype),
        ellipse_alphas=ell_alphas.float(),
        report=report,
        merged_from=merged_from,
    )
    plan.check()
    report.update(
        n_outliers=int(outlier_pos.numel()),
        n_ellipses=int(ellipse.sum()),
        n_inliers=int((~ellipse).sum()),
        time_s=time.perf_counter() - started,
    )
    return plan
