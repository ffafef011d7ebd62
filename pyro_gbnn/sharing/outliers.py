"""Outlier weights that are kept out of weight sharing (Sec. 4.1, Sec. 4.2 "Cluster Size Reductions").

Extreme weights are likely influential, so 2DGBNN keeps their own (mu, sigma) instead of
sharing a mixture component: a weight is an outlier when ``|mu| > tau_w`` or when its
accumulated gradient magnitude is in the top ``P_g`` fraction (Alg. 1 line 6). After the
mixture fit, components with fewer than ``N_min`` members are dissolved and their members
become outliers too (App. I.5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError

__all__ = ["outlier_mask", "top_fraction_count", "dissolve_small_clusters"]


def top_fraction_count(fraction: float, n: int) -> int:
    """How many of n items form the top ``fraction``: ``ceil(fraction * n)``.

    The product is rounded to 9 decimals first, so ``0.01 * 300`` (3.0000000000000004 in
    floating point) gives 3, not 4.
    """
    return min(n, math.ceil(round(fraction * n, 9)))


def _top_count_mask(values: Tensor, count: int) -> Tensor:
    """Mask of exactly ``count`` largest entries of 1-D ``values``; ties go to lower indices.

    O(n): ``kthvalue`` finds the count-th largest value v; everything above v is in, and
    the remaining places go to the first entries equal to v. Same result as a stable
    descending sort, without sorting.
    """
    n = values.numel()
    threshold = torch.kthvalue(values, n - count + 1).values
    mask = values > threshold
    ties = (values == threshold).nonzero().squeeze(1)
    mask[ties[: count - int(mask.sum())]] = True
    return mask


def outlier_mask(
    mu: Tensor,
    grad_magnitude: Tensor | None = None,
    tau_w: float | None = 0.2,
    top_grad_fraction: float | None = 0.01,
) -> Tensor:
    """Outlier weights by the mean threshold and/or the gradient-percentile threshold.

    A weight is an outlier if ``|mu| > tau_w`` (strict) OR it is among the
    ``ceil(top_grad_fraction * n)`` weights with the largest gradient magnitude. Exactly
    that many are picked, ties at the threshold broken deterministically in favour of the
    lower flat index (as a stable descending sort would), so the count does not depend on
    ties; found in O(n) with ``kthvalue``, not a sort.
    Gradients are passed in already accumulated (e.g. mean |grad| over the last epoch of
    pre-training); their absolute value is taken, so signed gradients also work.

    Either criterion can be switched off: ``tau_w=None``, or ``top_grad_fraction`` None or
    0. The gradient criterion is also skipped when ``grad_magnitude`` is None.

    Args:
        mu: [...] weight means, any shape (all weights of a layer or network, flattened or not).
        grad_magnitude: [...] gradient magnitudes, same shape as mu, or None.
        tau_w: mean threshold (paper: 0.2), >= 0, or None.
        top_grad_fraction: fraction P_g in [0, 1] of largest gradients (paper: 0.01), or None.

    Returns:
        Bool tensor shaped like mu, True for outliers.
    """
    if not isinstance(mu, Tensor) or not mu.is_floating_point():
        what = f"dtype {mu.dtype}" if isinstance(mu, Tensor) else type(mu).__name__
        raise UsageError(f"mu must be a floating-point tensor of weight means, got {what}")
    if tau_w is not None and (
        isinstance(tau_w, bool) or not isinstance(tau_w, (int, float)) or not math.isfinite(tau_w) or tau_w < 0
    ):
        raise UsageError(f"tau_w must be a finite number >= 0 or None (criterion off), got {tau_w!r}")
    if top_grad_fraction is not None and (
        isinstance(top_grad_fraction, bool)
        or not isinstance(top_grad_fraction, (int, float))
        or not 0 <= top_grad_fraction <= 1
    ):
        raise UsageError(
            f"top_grad_fraction must be a number in [0, 1] or None (criterion off), got {top_grad_fraction!r}"
        )
    if grad_magnitude is not None:
        if not isinstance(grad_magnitude, Tensor) or grad_magnitude.shape != mu.shape:
            shape = tuple(grad_magnitude.shape) if isinstance(grad_magnitude, Tensor) else type(grad_magnitude).__name__
            raise UsageError(f"grad_magnitude must be a tensor shaped like mu {tuple(mu.shape)}, got {shape}")
        if not bool(torch.isfinite(grad_magnitude).all()):
            raise UsageError("grad_magnitude contains NaN or infinite values; need finite accumulated gradients")

    mask = torch.zeros(mu.shape, dtype=torch.bool, device=mu.device)
    if tau_w is not None:
        mask |= mu.abs() > tau_w
    if grad_magnitude is not None and top_grad_fraction:
        flat = grad_magnitude.reshape(-1).abs()
        count = top_fraction_count(float(top_grad_fraction), flat.numel())
        if count:
            mask.view(-1).logical_or_(_top_count_mask(flat, count))
    return mask


def dissolve_small_clusters(
    assignments: Tensor, num_components: int, min_size: int = 30
) -> tuple[Tensor, Tensor, Tensor]:
    """Dissolve components with fewer than ``min_size`` members; their members become outliers.

    Small clusters carry too little evidence to be a shared distribution (App. I.5 uses
    N_min = 30 in the text, 20 in Table 14). Surviving components are renumbered
    contiguously in their original order, so ``remap[assignments]`` gives the new index of
    every kept point and ``kept_components`` selects the surviving means/covs/weights.

    Args:
        assignments: [N] long component index per point; -1 marks a point that is already
            an outlier (it stays one and counts towards no cluster).
        num_components: K, the number of components before dissolving.
        min_size: smallest member count that survives.

    Returns:
        (keep_mask [N] bool: point still belongs to a kept component,
         kept_components [K_kept] long: old indices of the surviving components, ascending,
         remap [K] long: new index of each old component, -1 if dissolved).
    """
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 0:
        raise UsageError(f"num_components must be an integer >= 0, got {num_components!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise UsageError(f"min_size must be an integer >= 0 (minimum members per cluster), got {min_size!r}")
    if not isinstance(assignments, Tensor) or assignments.dim() != 1:
        shape = tuple(assignments.shape) if isinstance(assignments, Tensor) else type(assignments).__name__
        raise UsageError(f"assignments must be a 1-D [N] tensor of component indices, got shape {shape}")
    if assignments.is_floating_point() or assignments.is_complex() or assignments.dtype == torch.bool:
        raise UsageError(f"assignments must be an integer tensor of component indices, got dtype {assignments.dtype}")
    assignments = assignments.long()
    if assignments.numel() and (int(assignments.min()) < -1 or int(assignments.max()) >= num_components):
        raise UsageError(
            f"assignments must lie in [0, {num_components - 1}] (or -1 for an outlier), "
            f"got range [{int(assignments.min())}, {int(assignments.max())}]"
        )
    assigned = assignments >= 0
    counts = torch.bincount(assignments[assigned], minlength=num_components)
    kept = counts >= min_size
    kept_components = kept.nonzero().squeeze(1)
    remap = torch.full((num_components,), -1, dtype=torch.long, device=assignments.device)
    remap[kept_components] = torch.arange(kept_components.numel(), device=assignments.device)
    keep_mask = assigned.clone()
    keep_mask[assigned] = kept[assignments[assigned]]
    return keep_mask, kept_components, remap
