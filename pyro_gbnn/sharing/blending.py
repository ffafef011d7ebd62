"""Alpha-blending of weights that sit outside their own component's ellipse (Sec. 4.3).

A point (mu, sigma) whose squared Mahalanobis distance to its own component exceeds the
chi-square(2) 95% quantile lies outside that component's 95% ellipse, so the hard
assignment misrepresents it (App. B, "ellipse weights"). Such a weight is instead drawn
from a blend of its k nearest components (Eq. 7), each weighted by the density of the
point under it, normalised to sum to one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError
from pyro_gbnn.sharing.gaussians import (
    _LOG_2PI,
    _check_gaussians,
    _check_points,
    _det,
    _inverse_entries,
)

__all__ = ["CHI2_2DOF_95", "ellipse_mask", "blend_weights", "nearest_components"]

CHI2_2DOF_95 = -2.0 * math.log(0.05)
"""95% quantile of chi-square with 2 degrees of freedom, ``-2 ln 0.05 = 5.99146...``.

The chi-square(2) CDF is ``1 - exp(-x/2)``, so the quantile is exact; the paper prints it
rounded as 5.991 (Sec. 4.3, Table 14).
"""

_CHUNK_ELEMENTS = 1 << 21


def _check_assignments(assignments: object, n: int, k: int, device: torch.device) -> Tensor:
    if not isinstance(assignments, Tensor) or assignments.shape != (n,):
        shape = tuple(assignments.shape) if isinstance(assignments, Tensor) else type(assignments).__name__
        raise UsageError(f"assignments must be a [N] tensor with N={n} (one component per point), got {shape}")
    if assignments.is_floating_point() or assignments.is_complex() or assignments.dtype == torch.bool:
        raise UsageError(f"assignments must be an integer tensor of component indices, got dtype {assignments.dtype}")
    if n and (int(assignments.min()) < 0 or int(assignments.max()) >= k):
        raise UsageError(
            f"assignments must lie in [0, {k - 1}] for K={k} components, "
            f"got range [{int(assignments.min())}, {int(assignments.max())}]"
        )
    return assignments.to(device=device, dtype=torch.long)


def ellipse_mask(
    points: Tensor,
    means: Tensor,
    covs: Tensor,
    assignments: Tensor,
    threshold: float = CHI2_2DOF_95,
) -> Tensor:
    """Which points lie outside the 95% ellipse of their own component.

    True where ``(x - m_a)^T S_a^-1 (x - m_a) > threshold`` with a the point's assigned
    component; those points are the ones to alpha-blend (Alg. 1 lines 10-17). Only each
    point's own component is evaluated, a chunk of points at a time, so memory is O(N + K),
    not O(N K).

    Args:
        points: [N, 2] (mu, sigma) points.
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive definite covariances.
        assignments: [N] integer index of each point's component.
        threshold: squared-Mahalanobis cut-off; default the chi-square(2) 95% quantile.

    Returns:
        [N] bool, True outside the ellipse (strictly beyond the threshold).
    """
    k = _check_gaussians(means, covs, definite=True)
    _check_points(points, means.dtype)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise UsageError(f"threshold must be a number >= 0 (a squared Mahalanobis distance), got {threshold!r}")
    a = _check_assignments(assignments, points.shape[0], k, points.device)
    p00, p01, p11 = _inverse_entries(covs)
    outside = torch.empty(points.shape[0], dtype=torch.bool, device=points.device)
    for start in range(0, points.shape[0], _CHUNK_ELEMENTS):  # bounded temporaries at ImageNet size
        part = a[start : start + _CHUNK_ELEMENTS]
        d = points[start : start + _CHUNK_ELEMENTS] - means[part]
        dx, dy = d[:, 0], d[:, 1]
        d2 = p00[part] * dx * dx + 2 * p01[part] * dx * dy + p11[part] * dy * dy
        outside[start : start + _CHUNK_ELEMENTS] = d2 > threshold
    return outside


def blend_weights(
    points: Tensor,
    means: Tensor,
    covs: Tensor,
    k: int = 5,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k nearest components of each point and their blending coefficients (Eq. 7).

    Nearest is by squared Mahalanobis distance. The coefficient of component j is
    proportional to the Gaussian density ``N(x | m_j, S_j)`` of the point, normalised over
    the k chosen components; it is computed as a softmax of log densities, so points far
    from every component (densities that underflow to 0) still get finite coefficients.
    The density is evaluated at the same (mu, sigma) point that was clustered.

    Points are processed in chunks with one reused [chunk, K] buffer, so memory stays
    bounded when N is millions and K thousands. The k nearest are ranked with a float64
    quadratic-form product (one pass over the buffer); their distances and densities are
    then recomputed directly, so alphas carry no cancellation error.

    Args:
        points: [N, 2] (mu, sigma) points.
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive definite covariances.
        k: number of components to blend; capped at K.
        chunk_size: points per chunk; None picks 2^21 / K (a 16 MB float64 buffer,
            which measured faster than larger ones on CPU).

    Returns:
        (indices [N, k'] long, alphas [N, k'] in the points' dtype) with k' = min(k, K);
        columns are ordered by increasing Mahalanobis distance and each alpha row sums to 1.
    """
    _check_gaussians(means, covs, definite=True)
    _check_points(points, means.dtype)
    idx, d2 = _nearest_components(points, means, covs, k, chunk_size)
    log_norm = -_LOG_2PI - 0.5 * _det(covs).log()
    return idx, torch.softmax(-0.5 * d2 + log_norm[idx], dim=1)


def nearest_components(
    points: Tensor, means: Tensor, covs: Tensor, k: int = 1, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The k components nearest to each point by squared Mahalanobis distance, and those distances.

    Same chunked search as :func:`blend_weights` (memory bounded for millions of points
    and thousands of components).

    Returns:
        (indices [N, k'] long, squared distances [N, k'] in the points' dtype), k' = min(k, K),
        columns by increasing distance.
    """
    _check_gaussians(means, covs, definite=True)
    _check_points(points, means.dtype)
    return _nearest_components(points, means, covs, k, chunk_size)


def _nearest_components(
    points: Tensor, means: Tensor, covs: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    n_comp = means.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be an integer >= 1 (components to blend), got {k!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise UsageError(f"chunk_size must be an integer >= 1 or None (automatic), got {chunk_size!r}")
    if n_comp == 0:
        raise UsageError("need at least one component (K >= 1) to blend over, got K=0")
    kk = min(k, n_comp)
    n = points.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n_comp)
    chunk_size = min(chunk_size, max(n, 1))
    p00, p01, p11 = _inverse_entries(covs)
    ref, coef = _quadratic_form(means, covs)
    buf = torch.empty((chunk_size, n_comp), dtype=coef.dtype, device=points.device)
    indices = torch.empty((n, kk), dtype=torch.long, device=points.device)
    distances = torch.empty((n, kk), dtype=points.dtype, device=points.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        chunk = points[start:stop]
        xy = chunk.to(coef.dtype) - ref
        x, y = xy[:, 0], xy[:, 1]
        feats = torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], 1)
        scores = torch.mm(feats, coef, out=buf[: stop - start])
        idx = torch.topk(scores, kk, dim=1, largest=False, sorted=False).indices
        d = chunk[:, None, :] - means[idx]
        dx, dy = d[..., 0], d[..., 1]
        d2 = (p00[idx] * dx * dx + 2 * p01[idx] * dx * dy + p11[idx] * dy * dy).clamp_min(0)
        d2, order = torch.sort(d2, dim=1)
        idx = idx.gather(1, order)
        indices[start:stop] = idx
        distances[start:stop] = d2
    return indices, distances


def _quadratic_form(means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
    """Squared Mahalanobis distance as one matrix product, for ranking components fast.

    With x, y the point's coordinates relative to ``ref`` (the mean of the means),
    ``D^2 = [x^2, xy, y^2, x, y, 1] @ coef[:, k]``: one [C, 6] x [6, K] product writes the
    [C, K] table in a single pass instead of the eight element-wise passes of the direct
    form. The expansion cancels when covariances are tiny next to the coordinates, so it
    is done in float64 and only used to pick the k nearest; their distances are then
    recomputed directly in the input dtype.
    """
    m64 = means.to(torch.float64)
    ref = m64.mean(0)
    mx, my = (m64 - ref).unbind(1)
    p00, p01, p11 = _inverse_entries(covs.to(torch.float64))
    coef = torch.stack(
        [
            p00,
            2 * p01,
            p11,
            -2 * (p00 * mx + p01 * my),
            -2 * (p01 * mx + p11 * my),
            p00 * mx * mx + 2 * p01 * mx * my + p11 * my * my,
        ]
    )
    return ref, coef
