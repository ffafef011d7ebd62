"""Merging of close mixture components (Sec. 4.2 "Merging Gaussians", Alg. 1 lines 18-24, App. H).

After the mixture is fitted, components that are nearly the same distribution, see nearly
the same gradient and have nearly the same spread are merged, repeatedly, until no pair
qualifies. Three tests must all pass for a pair (i, j); a threshold set to None is skipped:

* distance: ``W2(N_i, N_j) < tau_d`` with W2 the Wasserstein-2 *distance*, i.e. the square
  root of Eq. 4 (the paper thresholds "the Wasserstein distance"; Eq. 4 is its square);
* gradient: ``|g_i - g_j| < tau_g`` with g the gradient magnitude at the component centres;
* variance: ``|tr S_i - tr S_j| < tau_v``. "Variance" of a 2D component is taken as the
  trace of its covariance (total variance over the mu and sigma axes), which is basis-free
  and is what Eq. 4's covariance term compares.

Each round merges many disjoint pairs at once: the greedy matching that takes qualifying
pairs in order of increasing W2 and skips any pair touching an already matched component.
It is computed without a Python loop over pairs by repeatedly matching *mutual nearest
neighbours* (locally dominant edges), which yields exactly the sorted greedy matching
when ties are broken by index.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError
from pyro_gbnn.sharing.gaussians import (
    MERGE_RULES,
    _check_gaussians,
    _merge,
    _pairwise_wasserstein2,
    _trace,
)

__all__ = ["MergeResult", "merge_components"]


class MergeResult(NamedTuple):
    """Components after merging, and where each original component went.

    Attributes:
        means: [K_new, 2] merged means.
        covs: [K_new, 2, 2] merged covariances.
        weights: [K_new] summed weights (member counts if weights were None).
        mapping: [K_old] long, new index of every original component, composed over all
            rounds; re-point a weight's component index with ``mapping[assignments]``.
            The merged gradient of a new component, for the weighted rules, is the
            weight-averaged gradient of its members (use ``index_add_`` with ``mapping``).
        rounds: number of rounds in which at least one pair merged.
    """

    means: Tensor
    covs: Tensor
    weights: Tensor
    mapping: Tensor
    rounds: int


def _check_threshold(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number >= 0 or None (test skipped), got {value!r}")
    return float(value)


def _check_vector(x: object, name: str, k: int, like: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.shape != (k,):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise UsageError(f"{name} must be a [K] tensor with K={k} (one value per component), got {shape}")
    x = x.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(x).all()):
        raise UsageError(f"{name} contains NaN or infinite values; need finite numbers")
    return x


def _greedy_matching(dist: Tensor) -> Tensor:
    """Greedy matching of a symmetric [K, K] cost matrix; inf marks a forbidden pair.

    Equivalent to sorting the allowed pairs by (cost, lower index, higher index) and taking
    every pair whose two ends are still free. A pair that is each end's cheapest allowed
    pair (a mutual nearest neighbour) is cheaper than every pair it could conflict with,
    so the sorted greedy pass takes it; matching all of them, dropping their ends and
    repeating reproduces that pass. ``argmin`` returns the first (lowest-index) minimum,
    which is the same tie order. Usually a handful of iterations; each one matches at
    least the globally cheapest remaining pair.

    Returns:
        [K] long: the partner of each component, -1 if unmatched.
    """
    k = dist.shape[0]
    partner = torch.full((k,), -1, dtype=torch.long, device=dist.device)
    idx = torch.arange(k, device=dist.device)
    while True:
        alive = torch.isfinite(dist).any(1)
        if not bool(alive.any()):
            return partner
        if not bool(alive.all()):
            idx, dist = idx[alive], dist[alive][:, alive]
        best = dist.argmin(1)
        local = torch.arange(idx.shape[0], device=dist.device)
        mutual = best[best] == local
        partner[idx[mutual]] = idx[best[mutual]]
        free = ~mutual
        idx, dist = idx[free], dist[free][:, free]


def merge_components(
    means: Tensor,
    covs: Tensor,
    weights: Tensor | None,
    grad_at_centres: Tensor | None,
    tau_d: float | None,
    tau_g: float | None = None,
    tau_v: float | None = None,
    rule: str = "barycenter",
    max_rounds: int | None = None,
    weighted: bool = True,
) -> MergeResult:
    """Merge close mixture components until no pair passes all thresholds.

    Each round computes all pairwise W2 distances at once, forms the greedy matching of
    qualifying pairs by increasing W2 (many merges per round), merges every matched pair
    with ``rule`` (see :func:`~pyro_gbnn.sharing.gaussians.merge_gaussians`), and repeats.
    Weights add; the gradient at a merged centre is the average of the pair's gradients
    in the same proportions as the merge (weight-averaged when ``weighted``). A pair
    qualifies when ``W2 < tau_d``, ``|g_i - g_j| < tau_g`` and ``|tr S_i - tr S_j| < tau_v``
    (strict; None skips a test; all None merges everything).

    Args:
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive semi-definite covariances.
        weights: [K] non-negative mixture weights or member counts; None means 1 each
            (the returned weights are then member counts).
        grad_at_centres: [K] gradient magnitude at each centre; needed when tau_g is set.
        tau_d: threshold on the W2 distance (sqrt of Eq. 4), units of the (mu, sigma) plane.
        tau_g: threshold on the gradient difference.
        tau_v: threshold on the difference of covariance traces.
        rule: merge rule, one of ``"barycenter"``, ``"moments"``, ``"paper"``.
        max_rounds: stop after this many merging rounds (None: until nothing qualifies).
        weighted: weight each merge by the components' weights (barycenter at
            t = w_j / (w_i + w_j), weighted moments) instead of 1/2 each. Ignored by the
            ``"paper"`` rule, which is equal-weight by definition.

    Returns:
        :class:`MergeResult` with the merged components and the composed index mapping.
    """
    if rule not in MERGE_RULES:
        raise UsageError(f"unknown merge rule {rule!r}; accepted rules: {', '.join(MERGE_RULES)}")
    k = _check_gaussians(means, covs, definite=False)
    tau_d = _check_threshold(tau_d, "tau_d")
    tau_g = _check_threshold(tau_g, "tau_g")
    tau_v = _check_threshold(tau_v, "tau_v")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0):
        raise UsageError(f"max_rounds must be an integer >= 0 or None (no limit), got {max_rounds!r}")
    if weights is None:
        weights = torch.ones(k, dtype=means.dtype, device=means.device)
    else:
        weights = _check_vector(weights, "weights", k, means)
        if bool((weights < 0).any()):
            raise UsageError(f"weights must be non-negative, got minimum {float(weights.min()):.3g}")
    if grad_at_centres is not None:
        grad_at_centres = _check_vector(grad_at_centres, "grad_at_centres", k, means)
    elif tau_g is not None:
        raise UsageError("tau_g is set but grad_at_centres is None; pass [K] gradients or set tau_g=None")

    mapping = torch.arange(k, device=means.device)
    grads = grad_at_centres
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        n = means.shape[0]
        if n < 2:
            break
        dist = _pairwise_wasserstein2(means, covs).sqrt_()
        allowed = ~torch.eye(n, dtype=torch.bool, device=means.device)
        if tau_d is not None:
            allowed &= dist < tau_d
        if tau_g is not None:
            allowed &= (grads[:, None] - grads[None, :]).abs() < tau_g
        if tau_v is not None:
            var = _trace(covs)
            allowed &= (var[:, None] - var[None, :]).abs() < tau_v
        partner = _greedy_matching(dist.masked_fill_(~allowed, math.inf))
        local = torch.arange(n, device=means.device)
        first = partner > local
        if not bool(first.any()):
            break
        i = local[first]
        j = partner[first]
        wi, wj = weights[i], weights[j]
        total = wi + wj
        if weighted and rule != "paper":
            t = torch.where(total > 0, wj / torch.where(total > 0, total, torch.ones_like(total)), 0.5)
        else:
            t = torch.full_like(total, 0.5)
        new_mean, new_cov = _merge(means[i], covs[i], means[j], covs[j], rule, t)

        keep = (partner < 0) | first
        new_index = torch.cumsum(keep, 0) - 1
        new_index[j] = new_index[i]
        slots = new_index[i]
        means, covs, weights = means[keep].clone(), covs[keep].clone(), weights[keep].clone()
        means[slots], covs[slots], weights[slots] = new_mean, new_cov, total
        if grads is not None:
            new_grad = (1 - t) * grads[i] + t * grads[j]
            grads = grads[keep].clone()
            grads[slots] = new_grad
        mapping = new_index[mapping]
        rounds += 1
    return MergeResult(means, covs, weights, mapping, rounds)
