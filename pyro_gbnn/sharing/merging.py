"""Merging of close mixture components (Sec. 4.2 "Merging Gaussians", Alg. 1 lines 18-24, App. H).

After the mixture is fitted, components that are nearly the same distribution, see a
small gradient and are narrow are merged, repeatedly, until no pair qualifies. The tests
follow the text of Sec. 4.2 and the authors' released code (Alg. 1 writes differences
Delta_g, Delta_v instead; the text and the code threshold the values themselves). A pair
(i, j) qualifies when every test that is switched on passes:

* distance: ``W2^2(N_i, N_j) < tau_w2sq`` with W2^2 the *squared* Wasserstein-2 distance
  of Eq. 4, in squared units of the (mu, sigma) plane (App. H: 1.5e-7);
* overlap: ``W2^2(N_i, N_j) < tau_overlap * (tr S_i + tr S_j) / 2``: the pair is closer
  than its own spread, so one Gaussian describes both (a threshold relative to the
  components, where ``tau_w2sq`` is one in the plane's units; see below);
* neighbours: j is among the ``neighbours`` nearest centres of i, or i among those of j,
  the component itself counted (Euclidean distance between centres). This is the
  authors' ``topk(k=3)``, whose first hit is the component itself: 3 means 2 neighbours;
* gradient: ``g_i < tau_grad`` and ``g_j < tau_grad``, g the gradient magnitude at each
  centre as the caller measures it (the authors compare |gradient x learning rate| with
  0.15; on real posteriors the products are ~1e-7, so the test passes everywhere);
* variance: ``v_i < tau_var`` and ``v_j < tau_var`` with v the authors' statistic,
  ``torch.var`` over the members' (mu, sigma) values pooled into one sample (the
  authors: 1e-3). Written in a component's moments, v = tr S / 2 + (m_mu - m_sigma)^2 / 4:
  it grows with the spread *and* with the gap between the mean and std coordinates, so
  it keeps components with large |mu| apart (|m_mu - m_sigma| above ~0.063 never pass).

Why a relative threshold: the authors cluster (mu, rho) with sigma = log(0.0003 + e^rho),
i.e. rho = log(e^sigma - 0.0003) = sigma - 0.0003 to within 0.03% for sigma < 0.1: the
same plane as ours, shifted. What differs is the cloud in it. Their rho starts at 0 +- 7e-5
and their stage 1 has no KL term to spread it, so if the std coordinate stays in that band
their 6,000 components line up along the mean axis ~1e-4 apart (W2^2 ~ 1e-8), where
1.5e-7 merges neighbours. Our stage 1 (with the prior's KL) spreads sigma over ~0.03; the
components tile a 2D cloud and neighbours are ~1e-6 apart in W2^2 (median on the real
ResNet-20 fixture at K = 6,000: 7e-7), so the same absolute threshold merges ~1% of them,
however long the run (docs/results.md, Table 10). ``tau_overlap`` asks the same question
in the components' own units and does not depend on how wide stage 1 left the cloud.

Each round merges many disjoint pairs at once: the greedy matching that takes qualifying
pairs in order of increasing W2 and skips any pair touching an already matched component.
It is computed without a Python loop over pairs by repeatedly matching *mutual nearest
neighbours* (locally dominant edges), which yields exactly the sorted greedy matching
when ties are broken by index. The authors run one such pass after each fine-tuning
epoch on components that do not move (their loop never steps the optimizer), so their
200 passes are our rounds until nothing qualifies.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError
from pyro_gbnn.sharing.gaussians import (
    EQUAL_WEIGHT_RULES,
    MERGE_RULES,
    _check_gaussians,
    _merge,
    _pairwise_wasserstein2,
    _trace,
)

__all__ = ["MergeResult", "merge_components", "pooled_variance"]


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


def _nearest_centres(means: Tensor, count: int) -> Tensor:
    """[K, K] bool: j is among the ``count`` nearest centres of i, i itself counted (the
    authors' ``topk``), or i among j's; the diagonal is False."""
    k = means.shape[0]
    d = torch.cdist(means, means).fill_diagonal_(-1.0)  # each centre first in its own ranking, even among twins
    near = torch.zeros(k, k, dtype=torch.bool, device=means.device)
    near.scatter_(1, d.topk(min(count, k), dim=1, largest=False).indices, True)
    return (near | near.T).fill_diagonal_(False)


def pooled_variance(means: Tensor, covs: Tensor) -> Tensor:
    """[K] the authors' variance statistic: ``torch.var`` over a component's members'
    (mu, sigma) values pooled into one sample, from the members' moments (population
    variance: tr S / 2 + (m_mu - m_sigma)^2 / 4)."""
    return 0.5 * _trace(covs) + 0.25 * (means[:, 0] - means[:, 1]).square()


def merge_components(
    means: Tensor,
    covs: Tensor,
    weights: Tensor | None,
    grad_at_centres: Tensor | None,
    tau_w2sq: float | None,
    *,
    tau_overlap: float | None = None,
    neighbours: int | None = None,
    tau_grad: float | None = None,
    tau_var: float | None = None,
    rule: str = "authors",
    max_rounds: int | None = None,
    weighted: bool = True,
) -> MergeResult:
    """Merge close mixture components until no pair passes all tests (see the module doc).

    Each round computes all pairwise W2^2 at once, forms the greedy matching of qualifying
    pairs by increasing W2 (many merges per round), merges every matched pair with
    ``rule`` (see :func:`~pyro_gbnn.sharing.gaussians.merge_gaussians`), and repeats.
    Weights add; the gradient at a merged centre is the average of the pair's gradients
    in the same proportions as the merge. Tests are strict; None skips one (all None
    merges everything).

    Args:
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive semi-definite covariances.
        weights: [K] non-negative mixture weights or member counts; None means 1 each
            (the returned weights are then member counts).
        grad_at_centres: [K] gradient magnitude at each centre; needed when tau_grad is set.
        tau_w2sq: threshold on the squared W2 distance (Eq. 4), squared (mu, sigma) units.
        tau_overlap: threshold on W2^2 relative to the pair's mean covariance trace.
        neighbours: only pairs among each component's this many nearest centres, the
            component itself counted (>= 2); None: all pairs.
        tau_grad: both centres' gradient magnitudes must be below it.
        tau_var: both components' pooled variances (:func:`pooled_variance`) must be below it.
        rule: merge rule, one of ``"authors"`` (average), ``"barycenter"``, ``"moments"``,
            ``"paper"``.
        max_rounds: stop after this many merging rounds (None: until nothing qualifies).
        weighted: weight each merge by the components' weights (barycenter at
            t = w_j / (w_i + w_j), weighted moments) instead of 1/2 each. Ignored by the
            ``"authors"`` and ``"paper"`` rules, which are equal-weight by definition.

    Returns:
        :class:`MergeResult` with the merged components and the composed index mapping.
    """
    if rule not in MERGE_RULES:
        raise UsageError(f"unknown merge rule {rule!r}; accepted rules: {', '.join(MERGE_RULES)}")
    k = _check_gaussians(means, covs, definite=False)
    tau_w2sq = _check_threshold(tau_w2sq, "tau_w2sq")
    tau_overlap = _check_threshold(tau_overlap, "tau_overlap")
    tau_grad = _check_threshold(tau_grad, "tau_grad")
    tau_var = _check_threshold(tau_var, "tau_var")
    if neighbours is not None and (isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 2):
        raise UsageError(
            f"neighbours must be an integer >= 2 (the component itself counts as one, as in the authors' topk) "
            f"or None (all pairs), got {neighbours!r}"
        )
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
    elif tau_grad is not None:
        raise UsageError("tau_grad is set but grad_at_centres is None; pass [K] gradients or set tau_grad=None")

    mapping = torch.arange(k, device=means.device)
    grads = grad_at_centres
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        n = means.shape[0]
        if n < 2:
            break
        w2sq = _pairwise_wasserstein2(means, covs)
        allowed = ~torch.eye(n, dtype=torch.bool, device=means.device)
        if tau_w2sq is not None:
            allowed &= w2sq < tau_w2sq
        if tau_overlap is not None:
            spread = _trace(covs)
            allowed &= w2sq < tau_overlap * 0.5 * (spread[:, None] + spread[None, :])
        if neighbours is not None:
            allowed &= _nearest_centres(means, neighbours)
        if tau_grad is not None and grads is not None:  # grads: checked above when tau_grad is set
            small = grads < tau_grad
            allowed &= small[:, None] & small[None, :]
        if tau_var is not None:
            narrow = pooled_variance(means, covs) < tau_var
            allowed &= narrow[:, None] & narrow[None, :]
        partner = _greedy_matching(w2sq.masked_fill_(~allowed, math.inf))
        local = torch.arange(n, device=means.device)
        first = partner > local
        if not bool(first.any()):
            break
        i = local[first]
        j = partner[first]
        wi, wj = weights[i], weights[j]
        total = wi + wj
        if weighted and rule not in EQUAL_WEIGHT_RULES:
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
