"""Closed-form algebra of 2D Gaussians on the (mu, sigma) plane.

2DGBNN clusters the (mu, sigma) pairs of inlier weights with a mixture of 2D Gaussians
and then compares (Eq. 4), merges (Eqs. 5-6) and scores points against its components
(Sec. 4.3). Everything here is closed form for 2x2 matrices: no eigendecompositions, no
batched ``torch.linalg`` calls, so it vectorises over thousands of components and millions
of points and keeps the input dtype (float64 in, float64 out).

Conventions: a set of K Gaussians is ``means [K, 2]`` and ``covs [K, 2, 2]`` (symmetric
positive definite); points are ``[N, 2]``. Functions on pairs broadcast leading dims.

The two identities used throughout, for a 2x2 symmetric positive semi-definite A:

* ``sqrt(A) = (A + sqrt(det A) I) / sqrt(tr A + 2 sqrt(det A))`` (Cayley-Hamilton);
* ``tr sqrt(S1^1/2 S2 S1^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))``, so the
  Wasserstein cross term needs no matrix square root at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError

__all__ = [
    "EQUAL_WEIGHT_RULES",
    "MERGE_RULES",
    "sqrtm_2x2",
    "wasserstein2",
    "pairwise_wasserstein2",
    "merge_gaussians",
    "mahalanobis2",
    "log_density",
]

MERGE_RULES = ("authors", "barycenter", "moments", "paper")
"""Accepted ``rule`` names of :func:`merge_gaussians`."""

EQUAL_WEIGHT_RULES = ("authors", "paper")
"""Rules that average the pair with weight 1/2 each, whatever the members' counts."""

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- validation


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_float(x: object, name: str) -> Tensor:
    """``x`` itself, once it is a floating-point tensor (else a one-line error)."""
    if not isinstance(x, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UsageError(f"{name} must be a floating-point tensor (float32 or float64), got dtype {x.dtype}")
    return x


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise UsageError(f"{name} contains NaN or infinite values; need finite numbers")


def _check_mean(value: object, name: str) -> Tensor:
    mean = _check_float(value, name)
    if mean.dim() < 1 or mean.shape[-1] != 2:
        raise UsageError(f"{name} must have shape [..., 2] (2D means), got {_shape(mean)}")
    _check_finite(mean, name)
    return mean


def _check_cov(value: object, name: str, definite: bool = False) -> Tensor:
    """``value`` itself, once it has shape [..., 2, 2] and is finite, symmetric, and positive
    (semi-)definite."""
    cov = _check_float(value, name)
    if cov.dim() < 2 or cov.shape[-2:] != (2, 2):
        raise UsageError(f"{name} must have shape [..., 2, 2] (2x2 covariances), got {_shape(cov)}")
    _check_finite(cov, name)
    if cov.numel() == 0:
        return cov
    a, b, b2, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 0], cov[..., 1, 1]
    scale = a.abs() + c.abs()
    eps = torch.finfo(cov.dtype).eps
    asym = (b - b2).abs() > 1e3 * eps * scale
    if bool(asym.any()):
        at = tuple(int(i) for i in asym.nonzero()[0])
        raise UsageError(
            f"{name}{list(at)} is not symmetric (entries {float(b[at]):.3g} vs {float(b2[at]):.3g}); "
            "need symmetric 2x2 covariances"
        )
    det = a * c - b * b
    if definite:
        bad = (a <= 0) | (c <= 0) | (det <= 0)
        what = "positive definite"
    else:
        bad = (a < 0) | (c < 0) | (det < -16 * eps * (a * c + b * b))
        what = "positive semi-definite"
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise UsageError(
            f"{name}{list(at)} is not {what} (diagonal {float(a[at]):.3g}, {float(c[at]):.3g}, "
            f"det {float(det[at]):.3g}); need symmetric {what} 2x2 covariances"
        )
    return cov


def _check_gaussians(mean_values: object, cov_values: object, definite: bool = True) -> int:
    """Check a set ``means [K, 2]``, ``covs [K, 2, 2]``; return K."""
    means = _check_mean(mean_values, "means")
    if means.dim() != 2:
        raise UsageError(f"means must have shape [K, 2], got {_shape(means)}")
    covs = _check_cov(cov_values, "covs", definite=definite)
    if covs.dim() != 3 or covs.shape[0] != means.shape[0]:
        raise UsageError(f"covs must have shape [K, 2, 2] with K={means.shape[0]} to match means, got {_shape(covs)}")
    if means.dtype != covs.dtype:
        raise UsageError(f"means and covs must share a dtype, got {means.dtype} and {covs.dtype}")
    return means.shape[0]


def _check_points(value: object, dtype: torch.dtype) -> None:
    points = _check_float(value, "points")
    if points.dim() != 2 or points.shape[-1] != 2:
        raise UsageError(f"points must have shape [N, 2] ((mu, sigma) pairs), got {_shape(points)}")
    _check_finite(points, "points")
    if points.dtype != dtype:
        raise UsageError(f"points must have the dtype of means/covs ({dtype}), got {points.dtype}")


# --------------------------------------------------------------------------- 2x2 helpers


def _det(cov: Tensor) -> Tensor:
    return cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] * cov[..., 1, 0]


def _trace(cov: Tensor) -> Tensor:
    return cov[..., 0, 0] + cov[..., 1, 1]


def _eye_like(cov: Tensor) -> Tensor:
    return torch.eye(2, dtype=cov.dtype, device=cov.device)


def _sqrtm(cov: Tensor) -> Tensor:
    s = _det(cov).clamp_min(0).sqrt()
    t = (_trace(cov) + 2 * s).clamp_min(torch.finfo(cov.dtype).tiny).sqrt()
    return (cov + s[..., None, None] * _eye_like(cov)) / t[..., None, None]


def _cross_trace(cov1: Tensor, cov2: Tensor) -> Tensor:
    """tr((S1^1/2 S2 S1^1/2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)), broadcast."""
    tr12 = (cov1 * cov2.mT).sum((-2, -1))
    dd = (_det(cov1) * _det(cov2)).clamp_min(0).sqrt()
    return (tr12 + 2 * dd).clamp_min(0).sqrt()


def _inverse_entries(covs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(P00, P01, P11) of P = covs^-1 via the adjugate, each shaped like covs[..., 0, 0]."""
    det = _det(covs)
    return covs[..., 1, 1] / det, -covs[..., 0, 1] / det, covs[..., 0, 0] / det


# --------------------------------------------------------------------------- public API


def sqrtm_2x2(cov: Tensor) -> Tensor:
    """Principal square root of symmetric positive semi-definite 2x2 matrices, in closed form.

    By Cayley-Hamilton, ``sqrt(A) = (A + sqrt(det A) I) / sqrt(tr A + 2 sqrt(det A))``.
    This is exact, differentiable away from A = 0, and avoids a batched eigendecomposition
    (slow and ill-conditioned for the near-isotropic covariances EM produces).

    Args:
        cov: [..., 2, 2] symmetric positive semi-definite matrices.

    Returns:
        [..., 2, 2] symmetric positive semi-definite R with R @ R == cov (zero for cov == 0).
    """
    _check_cov(cov, "cov", definite=False)
    return _sqrtm(cov)


def wasserstein2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between Gaussians (Eq. 4 / Eq. 13 of the paper).

    ``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``; the trace of the cross
    term is ``sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))`` for 2x2 matrices, so no matrix
    square root is formed. The result is clamped at 0 against rounding. Units: squared
    units of the (mu, sigma) plane; take ``sqrt`` for the distance itself.

    Args:
        mean1, mean2: [..., 2] means; leading dims broadcast.
        cov1, cov2: [..., 2, 2] symmetric positive semi-definite covariances.

    Returns:
        [...] squared W2, the broadcast batch shape of the inputs.
    """
    _check_mean(mean1, "mean1")
    _check_mean(mean2, "mean2")
    _check_cov(cov1, "cov1")
    _check_cov(cov2, "cov2")
    return _wasserstein2(mean1, cov1, mean2, cov2)


def _wasserstein2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    dm = ((mean1 - mean2) ** 2).sum(-1)
    w2 = dm + _trace(cov1) + _trace(cov2) - 2 * _cross_trace(cov1, cov2)
    return w2.clamp_min(0)


def pairwise_wasserstein2(means: Tensor, covs: Tensor) -> Tensor:
    """Squared W2 between every pair of K Gaussians, vectorised (no loop over pairs).

    ``tr(S_i S_j)`` for all pairs is one [K, 4] x [4, K] product; the mean term is formed
    from coordinate differences (not ``|a|^2 + |b|^2 - 2ab``) so nearly equal means keep
    their precision. The matrix is exactly symmetric with a zero diagonal. Memory: a few
    [K, K] buffers (K = 6000 in float64 is 288 MB each).

    Args:
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive semi-definite covariances.

    Returns:
        [K, K] squared W2 distances.
    """
    _check_gaussians(means, covs, definite=False)
    return _pairwise_wasserstein2(means, covs)


def _pairwise_wasserstein2(means: Tensor, covs: Tensor) -> Tensor:
    k = means.shape[0]
    tr = _trace(covs)
    det = _det(covs).clamp_min(0)
    flat = covs.reshape(k, 4)
    cross = flat @ flat.T  # tr(S_i S_j^T) == tr(S_i S_j) for symmetric S_j
    cross.add_(2 * torch.outer(det, det).sqrt_()).clamp_min_(0).sqrt_()
    dx = means[:, 0, None] - means[None, :, 0]
    dy = means[:, 1, None] - means[None, :, 1]
    d = dx.square_().add_(dy.square_())
    d.add_(tr[:, None]).add_(tr[None, :]).sub_(2 * cross).clamp_min_(0)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return d


def _resolve_weights(weight1: Tensor | float | None, weight2: Tensor | float | None, like: Tensor) -> Tensor:
    """Interpolation parameter t = w2 / (w1 + w2) (1/2 for equal or missing weights)."""
    if weight1 is None and weight2 is None:
        return torch.full((), 0.5, dtype=like.dtype, device=like.device)
    if weight1 is None or weight2 is None:
        raise UsageError("give both weight1 and weight2, or neither (equal weights)")
    w1 = torch.as_tensor(weight1, dtype=like.dtype, device=like.device)
    w2 = torch.as_tensor(weight2, dtype=like.dtype, device=like.device)
    for w, name in ((w1, "weight1"), (w2, "weight2")):
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise UsageError(f"{name} must be finite and non-negative (member counts or mixture weights)")
    total = w1 + w2
    half = torch.full_like(total, 0.5)
    return torch.where(total > 0, w2 / torch.where(total > 0, total, torch.ones_like(total)), half)


def merge_gaussians(
    mean1: Tensor,
    cov1: Tensor,
    mean2: Tensor,
    cov2: Tensor,
    rule: str = "barycenter",
    weight1: Tensor | float | None = None,
    weight2: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge pairs of 2D Gaussians into one, by one of four rules.

    * ``"barycenter"`` (default): the W2 barycenter, i.e. the point at t = w2 / (w1 + w2)
      (1/2 without weights) on the W2 geodesic (McCann interpolant) from N1 to N2: mean
      ``(1-t) m1 + t m2``, cov ``A S1 A`` with ``A = (1-t) I + t T`` and T the optimal
      transport map ``S1^-1/2 (S1^1/2 S2 S1^1/2)^1/2 S1^-1/2``. Using ``T S1 T = S2`` and
      ``T S1 = (S2 S1 + d I) / c`` (d = sqrt(det S1 det S2), c = tr((S1^1/2 S2 S1^1/2)^1/2))
      this is ``(1-t)^2 S1 + t^2 S2 + t(1-t)(S1 S2 + S2 S1 + 2 d I) / c``: no inverse,
      so it stays exact for nearly singular S1. Identical inputs come back unchanged, and
      ``W2(merged, N1) = t W2(N1, N2)``, ``W2(merged, N2) = (1-t) W2(N1, N2)``.
    * ``"moments"``: moment matching of the mixture p N1 + (1-p) N2 with p = w1/(w1+w2):
      mean ``p m1 + (1-p) m2``, cov ``p S1 + (1-p) S2 + p(1-p)(m1-m2)(m1-m2)^T``. This is
      associative, so merging members in any order gives the moments of all of them.
    * ``"authors"``: the plain average the authors' released code uses, mean
      ``(m1+m2)/2`` (Eq. 5) and cov ``(S1+S2)/2`` (the first term of Eq. 6). Identical
      inputs come back unchanged; equal weights only.
    * ``"paper"``: Eqs. 5-6 exactly as printed: mean ``(m1+m2)/2``, cov
      ``(S1+S2)/2 + (m1-m2)(m1-m2)^T/8 + (S1^1/2 S2 S1^1/2)^1/2 / 2``. Note that for
      identical inputs this returns ``1.5 S``, so it is not the barycenter the paper cites
      (that would be ``S1/4 + S2/4 + ...`` in the commuting case); kept for reproduction.
      Equal weights only: passing weights with this rule is an error.

    Args:
        mean1, mean2: [..., 2] means; leading dims broadcast.
        cov1, cov2: [..., 2, 2] symmetric positive semi-definite covariances.
        rule: one of ``MERGE_RULES``.
        weight1, weight2: optional [...] non-negative weights (member counts or mixture
            weights) of the two Gaussians; both or neither.

    Returns:
        (mean [..., 2], cov [..., 2, 2]) of the merged Gaussians, in the input dtype.
    """
    if rule not in MERGE_RULES:
        raise UsageError(f"unknown merge rule {rule!r}; accepted rules: {', '.join(MERGE_RULES)}")
    _check_mean(mean1, "mean1")
    _check_mean(mean2, "mean2")
    _check_cov(cov1, "cov1")
    _check_cov(cov2, "cov2")
    if rule in EQUAL_WEIGHT_RULES and (weight1 is not None or weight2 is not None):
        raise UsageError(
            f"rule={rule!r} merges with equal weights only; drop weight1/weight2 or use rule='barycenter' or 'moments'"
        )
    t = _resolve_weights(weight1, weight2, mean1)
    return _merge(mean1, cov1, mean2, cov2, rule, t)


def _merge(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, rule: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """Unchecked merge; t = w2 / (w1 + w2) broadcastable to the batch shape."""
    diff = mean1 - mean2
    outer = diff[..., :, None] * diff[..., None, :]
    if rule == "authors":
        return (mean1 + mean2) / 2, (cov1 + cov2) / 2
    if rule == "paper":
        mean = (mean1 + mean2) / 2
        root = _sqrtm(cov1)
        cov = (cov1 + cov2) / 2 + outer / 8 + _sqrtm(root @ cov2 @ root) / 2
        return mean, (cov + cov.mT) / 2
    s = 1 - t
    mean = s[..., None] * mean1 + t[..., None] * mean2
    if rule == "moments":
        cov = s[..., None, None] * cov1 + t[..., None, None] * cov2 + (s * t)[..., None, None] * outer
        return mean, cov
    d = (_det(cov1) * _det(cov2)).clamp_min(0).sqrt()
    c = _cross_trace(cov1, cov2).clamp_min(torch.finfo(cov1.dtype).tiny)
    prod = cov1 @ cov2
    mixed = (prod + prod.mT + (2 * d)[..., None, None] * _eye_like(cov1)) / c[..., None, None]
    cov = (s * s)[..., None, None] * cov1 + (t * t)[..., None, None] * cov2 + (s * t)[..., None, None] * mixed
    return mean, cov


def mahalanobis2(points: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """Squared Mahalanobis distance of every point to every component.

    ``D^2 = (x - m)^T S^-1 (x - m)`` with the 2x2 inverse from the adjugate, evaluated on
    coordinate differences (not an expanded quadratic form, which cancels badly when the
    covariances are tiny next to the coordinates, as on the (mu, sigma) plane). Memory is
    a few [N, K] buffers; chunk the points for large N x K (see ``blend_weights``).

    Args:
        points: [N, 2] points.
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive definite covariances.

    Returns:
        [N, K] squared Mahalanobis distances (dimensionless).
    """
    _check_gaussians(means, covs, definite=True)
    _check_points(points, means.dtype)
    return _mahalanobis2(points, means, _inverse_entries(covs))


def _mahalanobis2(points: Tensor, means: Tensor, inv: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    p00, p01, p11 = inv
    dx = points[:, 0, None] - means[None, :, 0]
    dy = points[:, 1, None] - means[None, :, 1]
    cross = dx * dy
    cross.mul_(2 * p01)
    dx.square_().mul_(p00)
    dy.square_().mul_(p11)
    return dx.add_(dy).add_(cross).clamp_min_(0)


def log_density(points: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """Log pdf of every point under every component, ``log N(x | m_k, S_k)``.

    ``-D^2 / 2 - log(2 pi) - log(det S_k) / 2``, with D^2 from :func:`mahalanobis2`.

    Args:
        points: [N, 2] points.
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive definite covariances.

    Returns:
        [N, K] log densities (nats, per unit area of the (mu, sigma) plane).
    """
    _check_gaussians(means, covs, definite=True)
    _check_points(points, means.dtype)
    d2 = _mahalanobis2(points, means, _inverse_entries(covs))
    return d2.mul_(-0.5).sub_(_LOG_2PI + 0.5 * _det(covs).log())
