"""The 2D Gaussian mixture over the (mu, sigma) plane (Sec. 4.2, Eq. 3).

2DGBNN clusters the inlier weights, one point ``(mu_i, sigma_i)`` per weight, with a
full-covariance Gaussian mixture of K components (the paper uses K = 6000 on millions of
weights). :func:`fit_gmm_2d` fits it by mini-batch EM; :func:`gmm_log_likelihood` and
:func:`gmm_assign` score and assign points under a given mixture. Plain torch, no Pyro;
everything runs on the points' device.

How it scales. The E step of EM compares every point with every component, N x K work
(11M x 2000 = 2.2e10 pairs per sweep), but in two dimensions almost all of those pairs
are negligible. The plane is cut into cells that hold equal numbers of points; for each
cell the components whose density anywhere in the cell is below ``exp(-log_tol) / K``
times what the cell's best component guarantees everywhere in it are skipped. That bound
is rigorous (the min and max of each component's quadratic form over the cell's box), so
every point's density and responsibilities are exact to a relative
``exp(-log_tol)`` (1e-10 when computing in float32, 1e-16 in float64), far below the
rounding of the computation itself, while each point meets tens to a hundred or so
components instead of K. Points are sorted by cell once; a sweep takes blocks of
neighbouring cells and computes all their (point, candidate) log-densities as one batched
matrix product of quadratic features [1, x, y, x^2, xy, y^2] with per-component
coefficients, and the sufficient statistics as a second one.

Numerics. Points are standardised (each coordinate centred and divided by its standard
deviation; the sigma-coordinate is ~1e-3 in raw units), the point-by-component matrices
are float32 by default, features are taken about each cell's mean point, and
sufficient statistics are re-centred at each component's current mean and summed in
float64, so covariances of narrow components do not cancel against squared positions.
Where the expansion could still round by more than 1e-3 nats (a component much narrower
than its cell, e.g. a tight clump in a sparse tail), that block is computed in float64,
or with exact per-pair differences from the float64 input. 2x2 inverses and
determinants are written out in closed form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_gbnn import distributed as _dist
from pyro_gbnn.errors import UsageError

__all__ = ["GMMResult", "fit_gmm_2d", "gmm_log_likelihood", "gmm_assign"]

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)
# A component whose expected count falls below this many points is dropped (weight 0).
_DEAD_COUNT = 1e-6
# Most (point, component) pairs held at once: on CPU the [g, P, M] buffer (2 MiB in
# float32) stays in cache; on CUDA bigger blocks amortise kernel launches.
_CPU_CHUNK_ELEMENTS = 2**19
_CUDA_CHUNK_ELEMENTS = 2**25
# exp(-60) ~ 1e-26: log-ratios below this are clamped so exp and the products after it
# never produce subnormal floats (10x slower on x86); the added mass is far below rounding.
_MIN_LOG_RATIO = -60.0
# Blocks whose float32 log-densities could be off by more than this many nats (narrow
# components in large cells) are computed in float64, or exactly if even that is too coarse.
_MAX_ROUNDING = 1e-3
_FLOAT32_EPS = 2.0**-24
_FLOAT64_EPS = 2.0**-53
# Cells of the pruning grid: at most _MAX_GRID x _MAX_GRID, with about this many of the
# points of a sweep each: full sweeps (any smaller and per-block overhead dominates) and
# stepwise mini-batches (smaller cells, fewer candidates; blocks hold many cells).
_MAX_GRID = 64
_POINTS_PER_CELL = 1024
_BATCH_POINTS_PER_CELL = 64
_INIT_SUBSAMPLE = 100_000
# k-means++ takes K sequential draws of a few passes each; on fewer points than torch's
# parallel grain (32768) those passes run inline instead of waking a thread pool K x 6
# times, which on a busy machine was 100x slower (10 s instead of 0.1 s for K = 256).
_SEEDING_SUBSAMPLE = 32_000
_LLOYD_ITERATIONS = 5
_STEPWISE_POWER = 0.6
_MODES = ("epoch", "stepwise")
_INITS = ("kmeans++", "random")


@dataclass
class GMMResult:
    """A fitted 2D mixture, in the units of the input points.

    Attributes:
        weights: [K] mixing weights, sum 1; 0 marks a component that lost all its points
            during the fit (kept so indices stay stable).
        means: [K, 2] component means.
        covs: [K, 2, 2] component covariances (symmetric positive definite).
        mean_log_likelihood: mean over ALL points of log p(point) under the returned
            mixture (nats, density in the units of the points).
        history: per-epoch mean log-likelihoods. Epoch mode: ``history[i]`` is the exact
            value after i M steps, so ``history[0]`` scores the initialisation and
            ``history[-1] == mean_log_likelihood``; it never decreases. Stepwise mode:
            ``history[i]`` averages, over epoch i's mini-batches, each mini-batch's
            log-likelihood under the parameters before its update (a running estimate).
        n_iter: epochs run (M steps in epoch mode, passes over the data in stepwise mode).
        converged: whether the change of the last history entry fell below ``tol``.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor
    mean_log_likelihood: float
    history: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False


# ---------------------------------------------------------------------------------------
# Validation


def _check_points(points: Tensor) -> None:
    if not isinstance(points, Tensor):
        raise UsageError(f"points must be a torch.Tensor of shape [N, 2], got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise UsageError(f"points must have shape [N, 2] (one (mu, sigma) row per weight), got {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise UsageError("points is empty (shape [0, 2]); need at least one point")
    if not points.is_floating_point():
        raise UsageError(f"points must be a floating-point tensor, got dtype {points.dtype}")
    if not bool(torch.isfinite(points).all()):
        bad = int((~torch.isfinite(points)).any(dim=1).sum())
        raise UsageError(f"points must be finite, got {bad} row(s) with NaN or inf")


def _check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float_dtype(value: object, name: str) -> torch.dtype:
    if value not in (torch.float32, torch.float64):
        raise UsageError(f"{name} must be torch.float32 or torch.float64, got {value!r}")
    return value  # type: ignore[return-value]


def _check_mixture(weights: Tensor, means: Tensor, covs: Tensor) -> int:
    for name, value in (("weights", weights), ("means", means), ("covs", covs)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            what = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise UsageError(f"{name} must be a floating-point tensor, got {what}")
    if weights.dim() != 1 or weights.shape[0] == 0:
        raise UsageError(f"weights must have shape [K] with K >= 1, got {tuple(weights.shape)}")
    k = weights.shape[0]
    if tuple(means.shape) != (k, 2):
        raise UsageError(f"means must have shape [K, 2] = [{k}, 2], got {tuple(means.shape)}")
    if tuple(covs.shape) != (k, 2, 2):
        raise UsageError(f"covs must have shape [K, 2, 2] = [{k}, 2, 2], got {tuple(covs.shape)}")
    w = weights.detach().double()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise UsageError(f"weights must be finite and >= 0, got min {float(w.min()):.6g}")
    if abs(float(w.sum()) - 1.0) > 1e-4:
        raise UsageError(f"weights must sum to 1, got sum {float(w.sum()):.6g}")
    if not bool(torch.isfinite(means).all()) or not bool(torch.isfinite(covs).all()):
        raise UsageError("means and covs must be finite")
    c = covs.detach().double()
    det = c[:, 0, 0] * c[:, 1, 1] - 0.25 * (c[:, 0, 1] + c[:, 1, 0]) ** 2
    bad = (c[:, 0, 0] <= 0) | (det <= 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise UsageError(f"covs must be positive definite, component {first} is not: {c[first].tolist()}")
    return k


# ---------------------------------------------------------------------------------------
# Standardised frame


@dataclass
class _Frame:
    """Affine map to standardised coordinates: ``u = (x - center) / scale`` per coordinate.

    A coordinate with zero spread gets ``scale = |center|`` (or 1 if that is 0 too), so
    ``reg_covar`` still means "relative to the coordinate's size" for it.
    """

    center: Tensor  # [2] float64
    scale: Tensor  # [2] float64

    @classmethod
    def of(cls, points: Tensor) -> _Frame:
        x = points.detach().double()
        center = x.mean(0)
        scale = x.std(0, correction=0) if x.shape[0] > 1 else torch.zeros_like(center)
        return cls.with_spread(center, scale)

    @classmethod
    def with_spread(cls, center: Tensor, scale: Tensor) -> _Frame:
        """The frame of a data set with this mean and standard deviation (zero spread: see above)."""
        fallback = torch.where(center.abs() > 0, center.abs(), torch.ones_like(center))
        return cls(center, torch.where(scale > 0, scale, fallback))

    @property
    def log_jacobian(self) -> float:
        """log |du/dx|: add it to a log-density in u to get one in x."""
        return -float(self.scale.log().sum())

    def points(self, points: Tensor, dtype: torch.dtype) -> Tensor:
        """[2, ...] standardised points from [..., 2], coordinate-major so each coordinate is contiguous."""
        return torch.stack(
            [((points[..., j].detach().double() - self.center[j]) / self.scale[j]).to(dtype) for j in range(2)]
        )

    def to_unit(self, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scale
        return (means.double() - self.center) / s, covs.double() / (s[:, None] * s[None, :])

    def from_unit(self, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scale.to(means.dtype)
        return means * s + self.center.to(means.dtype), covs * (s[:, None] * s[None, :])


class _Shards:
    """Where this process's points sit among all processes' points, and the collectives a
    sharded fit needs; one process (``distributed=False``) holds them all.

    Ranks hold contiguous shards in rank order, so point i of the concatenation is known
    to every rank, and a seeded subsample of the concatenation (the initialisation's,
    the grid's) is the same on every rank and equal to the single-process one.
    """

    def __init__(self, n_local: int, distributed: bool) -> None:
        self.distributed = distributed and _dist.is_distributed()
        sizes = [int(v) for v in _dist.all_gather_objects(n_local)] if self.distributed else [n_local]
        self.offset = sum(sizes[: _dist.rank()]) if self.distributed else 0
        self.n_local, self.total = n_local, sum(sizes)

    def sum(self, tensor: Tensor) -> Tensor:
        return _dist.all_sum(tensor) if self.distributed else tensor

    def held(self, index: Tensor) -> Tensor:
        """Which entries of global ``index`` this rank holds (bool, ``index``'s shape)."""
        return (index >= self.offset) & (index < self.offset + self.n_local)

    def local(self, index: Tensor) -> Tensor:
        """The entries of global ``index`` held here, as local positions (in ``index``'s order)."""
        return index[self.held(index)] - self.offset

    def subsample(self, u: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """[2, s]: a seeded random subsample of all ranks' points ``u`` (local [2, n])."""
        index = _subsample_index(self.total, size, generator, u.device)
        if not self.distributed:
            return u[:, index]
        out = u.new_zeros(2, index.numel())
        out[:, self.held(index)] = u[:, self.local(index)]
        return self.sum(out)

    def frame(self, points: Tensor) -> _Frame:
        """The standardisation of all ranks' points (as :meth:`_Frame.of` of their concatenation)."""
        if not self.distributed:
            return _Frame.of(points)
        x = points.detach().double()
        center = self.sum(x.sum(0)) / self.total
        scale = (self.sum(((x - center) ** 2).sum(0)) / self.total).sqrt()
        return _Frame.with_spread(center, scale)


# ---------------------------------------------------------------------------------------
# Component table: per-component constants of the log-density, closed-form 2x2 algebra


class _Table(NamedTuple):
    """What the E step needs of each component, in standardised coordinates, float64.

    With precision [[a, b], [b, c]] (the closed-form inverse of the 2x2 covariance),
    ``log w_k N(u | m_k) = (na dx + nb dy) dx + nc dy^2 + logc`` where d = u - m_k,
    na = -a/2, nb = -b, nc = -c/2 and ``logc = log w - log 2pi - log det / 2``.
    """

    means: Tensor  # [K, 2]
    na: Tensor  # [K]
    nb: Tensor  # [K]
    nc: Tensor  # [K]
    logc: Tensor  # [K]; -inf for a dropped component


def _table(weights: Tensor, means: Tensor, covs: Tensor) -> _Table:
    weights, means, covs = weights.double(), means.double(), covs.double()
    sxx, sxy, syy = covs[:, 0, 0], 0.5 * (covs[:, 0, 1] + covs[:, 1, 0]), covs[:, 1, 1]
    det = sxx * syy - sxy * sxy
    logc = weights.log() - _LOG_2PI - 0.5 * det.log()
    return _Table(means, -0.5 * syy / det, sxy / det, -0.5 * sxx / det, logc)


def _design(table: _Table, comp: Tensor, center: Tensor, reach: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients of the log-densities of components ``comp`` ([g, m]) as a linear map
    of the features [1, x, y, x^2, xy, y^2] of ``u - center`` (center [g, 1, 2]).

    Returns the float64 coefficients [g, 6, m] and a bound on the rounding (nats) of
    evaluating them in float32 for the block's points (``reach`` [g, 2]: the largest
    |x - cx|, |y - cy| in each cell). That rounding is float32's epsilon times the sum of
    the expanded terms' sizes, bounded two ways: for every point of the cell, and (much
    smaller, for halo components) for the points close enough to the component to matter
    (within log-density 40 of its peak); the smaller bound counts. Expanding about a point
    inside the cell keeps it ~(cell size / component width)^2 x 6e-8, except for very
    narrow components in large (sparse, tail) cells: those blocks are swept in float64.
    """
    m = table.means[comp] - center
    na, nb, nc, logc = table.na[comp], table.nb[comp], table.nc[comp], table.logc[comp]
    mx, my = m[..., 0], m[..., 1]
    quadratic = (na * mx + nb * my) * mx + nc * my * my
    linear_x, linear_y = -2.0 * na * mx - nb * my, -nb * mx - 2.0 * nc * my
    coefficients = torch.stack([logc + quadratic, linear_x, linear_y, na, nb, nc], dim=-2)
    rx, ry = reach[:, 0:1], reach[:, 1:2]
    a_, b_, c_ = na.abs(), nb.abs(), nc.abs()
    anywhere = (
        a_ * mx * mx
        + b_ * (mx * my).abs()
        + c_ * my * my
        + linear_x.abs() * rx
        + linear_y.abs() * ry
        + a_ * rx * rx
        + b_ * rx * ry
        + c_ * ry * ry
    )
    smallest_precision = (a_ + c_) - torch.sqrt((a_ - c_) ** 2 + b_ * b_)  # eigenvalues of [[-2na, -nb], [-nb, -2nc]]
    near = torch.sqrt(80.0 / smallest_precision.clamp(min=1e-300))  # distance at which q = 80
    relevant = (a_ + b_ + c_) * (2.0 * torch.sqrt(rx * rx + ry * ry) + near) ** 2
    return coefficients, _FLOAT32_EPS * torch.minimum(anywhere, relevant).amax()


# ---------------------------------------------------------------------------------------
# Pruning grid


@dataclass
class _Grid:
    """Cells of roughly equal point counts covering all points, in serpentine order.

    Columns split x at quantiles; each column splits y at its own quantiles, so dense
    regions get small cells. Cells are numbered column by column, alternating the
    direction in y, so consecutive cell ids are neighbours and a run of points sorted by
    cell id covers a compact region. Edges are stored in the points' dtype so that
    assigning a point to a cell and bounding the cell's box use the same numbers.
    """

    x_inner: Tensor  # [G - 1] inner column edges
    y_inner: Tensor  # [G, G - 1] inner row edges of each column
    boxes: Tensor  # [G * G, 4] float64: x0, x1, y0, y1 of each cell (tight on the data)

    @property
    def size(self) -> int:
        return self.y_inner.shape[0]

    @classmethod
    def build(cls, u: Tensor, size: int, sub: Tensor) -> _Grid:
        """Grid for standardised points ``u`` ([2, N]) with ``size`` x ``size`` cells whose
        edges are quantiles of the subsample ``sub`` ([2, S])."""
        device, dtype = u.device, u.dtype
        sub = sub.double()
        q = torch.linspace(0.0, 1.0, size + 1, dtype=torch.float64, device=device)[1:-1]
        x_inner = torch.quantile(sub[0], q).to(dtype)
        col_sub = torch.bucketize(sub[0].to(dtype), x_inner, right=True)
        y_inner = torch.quantile(sub[1], q).to(dtype).repeat(size, 1)
        for i in range(size):
            column = sub[1][col_sub == i]
            if column.numel() > 0:
                y_inner[i] = torch.quantile(column, q).to(dtype)
        # Tight boxes: each column's actual extent in x and y over all points.
        col = torch.bucketize(u[0], x_inner, right=True)
        inf = torch.full((size,), math.inf, dtype=dtype, device=device)
        lo = [inf.scatter_reduce(0, col, u[j], "amin") for j in range(2)]
        hi = [(-inf).scatter_reduce(0, col, u[j], "amax") for j in range(2)]
        empty = ~torch.isfinite(lo[0])
        lo = [torch.where(empty, 0.0, v).double() for v in lo]
        hi = [torch.where(empty, 0.0, v).double() for v in hi]
        far = torch.full((size, 1), math.inf, dtype=torch.float64, device=device)
        y_edges = torch.cat([-far, y_inner.double(), far], dim=1)
        y_edges = torch.minimum(torch.maximum(y_edges, lo[1][:, None]), hi[1][:, None])
        cols = torch.arange(size, device=device).repeat_interleave(size)
        rows = torch.arange(size, device=device).repeat(size)
        rows = torch.where(cols % 2 == 0, rows, size - 1 - rows)  # serpentine
        boxes = torch.stack([lo[0][cols], hi[0][cols], y_edges[cols, rows], y_edges[cols, rows + 1]], dim=1)
        return cls(x_inner, y_inner, boxes)

    def sort(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Order [n] that sorts points ``u`` ([2, n]) by cell, and the sorted cell ids [n].

        Sorts by column (a radix sort of small integers), finds rows column by column,
        then sorts by cell; no per-point search over all cells.
        """
        g = self.size
        col = torch.bucketize(u[0], self.x_inner, right=True)
        by_col = torch.argsort(col.to(torch.int32), stable=True)
        col = col[by_col]
        y = u[1][by_col]
        row = torch.zeros_like(col)
        bounds = [0, *torch.bincount(col, minlength=g).cumsum(0).tolist()]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                row[lo:hi] = torch.bucketize(y[lo:hi], self.y_inner[i], right=True)
        cell = col * g + torch.where(col % 2 == 0, row, g - 1 - row)
        by_cell = torch.argsort(cell.to(torch.int32), stable=True)
        return by_col[by_cell], cell[by_cell]


def _grid_size(n: int, per_cell: int = _POINTS_PER_CELL) -> int:
    return max(1, min(_MAX_GRID, int(math.sqrt(n / per_cell))))


def _candidates(grid: _Grid, table: _Table, log_tol: float) -> Tensor:
    """[C, K] bool: which components can matter anywhere in each cell.

    For cell box B and component k with log-density ``l_k - q_k(u) / 2`` (q the
    Mahalanobis quadratic), ``max_B`` is ``l_k - min_B q_k / 2`` (0 if the mean is inside
    the box, else the best point on one of the four edges, a clamped 1D minimum) and
    ``min_B`` is attained at a corner. Component k is kept if its max reaches within
    ``log_tol + log K`` of the largest min over components: the dropped ones together
    then weigh less than ``exp(-log_tol)`` of every point's density in the cell.
    Evaluated in float64 (narrow components in large cells make float32 too coarse), with
    a margin of 1 nat.
    """
    mx, my = table.means[:, 0], table.means[:, 1]
    a, b, c = -2.0 * table.na, -table.nb, -2.0 * table.nc
    b2, y_slope, x_slope, logc = 2.0 * b, -b / c, -b / a, table.logc
    k = mx.shape[0]
    gap = log_tol + math.log(k) + 1.0
    boxes = grid.boxes
    out = torch.empty(boxes.shape[0], k, dtype=torch.bool, device=mx.device)
    block = max(1, 2**22 // k)

    def quad(dx: Tensor, dy: Tensor) -> Tensor:
        return (a * dx + b2 * dy).mul_(dx).addcmul_(c * dy, dy)

    for start in range(0, boxes.shape[0], block):
        box = boxes[start : start + block]
        x0, x1 = box[:, 0:1] - mx, box[:, 1:2] - mx
        y0, y1 = box[:, 2:3] - my, box[:, 3:4] - my
        q_min = torch.minimum(
            torch.minimum(quad(x0, torch.clamp(y_slope * x0, y0, y1)), quad(x1, torch.clamp(y_slope * x1, y0, y1))),
            torch.minimum(quad(torch.clamp(x_slope * y0, x0, x1), y0), quad(torch.clamp(x_slope * y1, x0, x1), y1)),
        )
        inside = (x0 <= 0) & (x1 >= 0) & (y0 <= 0) & (y1 >= 0)
        q_min.masked_fill_(inside, 0.0)
        q_max = torch.maximum(torch.maximum(quad(x0, y0), quad(x0, y1)), torch.maximum(quad(x1, y0), quad(x1, y1)))
        floor = (logc - 0.5 * q_max).amax(dim=1, keepdim=True)
        out[start : start + block] = logc - 0.5 * q_min >= floor - gap
    return out


# ---------------------------------------------------------------------------------------
# The sweep: E step over points sorted by cell


class _Sweep(NamedTuple):
    log_likelihood: float  # sum over points of log p(u), standardised units
    stats: Tensor | None  # [K, 6]: sums of r, r dx, r dy, r dx^2, r dx dy, r dy^2 with d = u - mean
    assignments: Tensor | None  # [n] long
    log_resp_max: Tensor | None  # [n]


def _sweep(
    u: Tensor,
    cells: Tensor,
    grid: _Grid,
    table: _Table,
    *,
    want: str,
    max_points: int,
    acc_dtype: torch.dtype,
    exact_points: Callable[[Tensor], Tensor] | None = None,
) -> _Sweep:
    """One E step over standardised points ``u`` ([2, n], sorted by ``cells`` ascending).

    ``want`` is "stats" (log-likelihood and sufficient statistics centred at the
    components' means), "ll" (log-likelihood only) or "assign" (also MAP components).

    Cells go through in blocks of g neighbouring cells, each cell's points padded to P
    and its candidate components padded to M (padding points are masked out, padding
    components point at a dummy with log-weight -1e30). For a block, the log-densities
    are one batched [g, P, 6] x [g, 6, M] product of the points' quadratic features
    (about the cell's centre) with the candidates' coefficients; the statistics are one
    batched [g, 6, P] x [g, P, M] product of the same features, scaled by 1/p(u), with
    exp(log-density - row max). g * P * M stays under a budget so the [g, P, M] buffer
    stays in cache, and at most ``max_points`` points go through at once.

    Where that expansion would round by more than 1e-3 nats (components far narrower
    than their cell), a block is done in float64, and if even that is too coarse, with
    per-pair differences ``u - mean`` (exact, ~3x slower; only for extreme components),
    taking the points from ``exact_points(index)`` ([2, ...] float64) when given, since
    float32 points may be too coarse for such components.
    """
    dtype, device = u.dtype, u.device
    n, k = u.shape[1], table.logc.shape[0]
    mask = _candidates(grid, table, _log_tol(dtype))
    budget = max(k, _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS)
    counts = torch.bincount(cells, minlength=mask.shape[0])
    offsets = counts.cumsum(0) - counts
    sums = [torch.bincount(cells, weights=u[j], minlength=mask.shape[0]) for j in range(2)]
    centers = torch.stack(sums, 1).double() / counts.clamp(min=1)[:, None]
    centers = centers.to(dtype).double()  # [C, 2] mean point of each cell, representable in dtype
    padded = _Table(
        torch.cat([table.means, table.means.new_zeros(1, 2)]),
        *(torch.cat([v, v.new_zeros(1)]) for v in (table.na, table.nb, table.nc)),
        torch.cat([table.logc, table.logc.new_full((1,), -1e30)]),
    )
    workspace = _Workspace(budget, 6 * min(budget, max(max_points, 1)), device)
    stats = torch.zeros(k + 1, 6, dtype=acc_dtype, device=device) if want == "stats" else None
    assignments = torch.empty(n, dtype=torch.long, device=device) if want == "assign" else None
    log_resp_max = torch.empty(n, dtype=dtype, device=device) if want == "assign" else None
    ll = torch.zeros((), dtype=torch.float64, device=device)
    every = torch.arange(k, device=device)
    for block, rows, width in _blocks(counts.tolist(), mask.sum(dim=1).tolist(), budget, max_points):
        g = len(block)
        cell = torch.tensor(block, device=device)
        count, offset, center = counts[cell], offsets[cell], centers[cell]
        chosen = mask[cell]  # [g, K]
        slot = torch.where(chosen, chosen.cumsum(dim=1) - 1, width)
        comp = torch.full((g, width + 1), k, dtype=torch.long, device=device)
        comp = comp.scatter_(1, slot, every.expand(g, k))[:, :width]  # [g, M], k = dummy
        box = grid.boxes[cell]
        reach = torch.maximum((box[:, 0::2] - center).abs(), (box[:, 1::2] - center).abs())
        design, rounding = _design(padded, comp, center[:, None, :], reach)  # [g, 6, M], nats in float32
        exact = rounding * (_FLOAT64_EPS / _FLOAT32_EPS) > _MAX_ROUNDING
        block_dtype = dtype if rounding <= _MAX_ROUNDING else torch.float64
        design = design.to(block_dtype)
        moments = torch.zeros(g, 6, width, dtype=acc_dtype, device=device) if want == "stats" else None
        step = max(1, min(rows, budget // (g * width), max_points // g))
        for first in range(0, rows, step):
            p = min(rows - first, step)
            at = torch.arange(first, first + p, device=device)
            valid = at < count[:, None]  # [g, p]
            index = (offset[:, None] + at).clamp_(max=n - 1)
            lp = workspace.work(block_dtype, (g, p, width))
            if exact:
                x = exact_points(index) if exact_points is not None else u[:, index].double()
                dx = x[0][:, :, None] - padded.means[comp][:, None, :, 0]  # [g, p, M]
                dy = x[1][:, :, None] - padded.means[comp][:, None, :, 1]
                na, nb, nc, logc = (v[comp][:, None, :] for v in padded[1:])
                torch.add(logc, (na * dx + nb * dy) * dx + nc * dy * dy, out=lp)
            else:
                phi = workspace.features(block_dtype, (g, 6, p))
                phi[:, 0].fill_(1.0)
                torch.sub(u[0][index].to(block_dtype), center[:, 0:1].to(block_dtype), out=phi[:, 1])
                torch.sub(u[1][index].to(block_dtype), center[:, 1:2].to(block_dtype), out=phi[:, 2])
                torch.mul(phi[:, 1], phi[:, 1], out=phi[:, 3])
                torch.mul(phi[:, 1], phi[:, 2], out=phi[:, 4])
                torch.mul(phi[:, 2], phi[:, 2], out=phi[:, 5])
                torch.bmm(phi.transpose(1, 2), design, out=lp)  # log w_k N(u | k)
            if want == "assign":
                top, arg = lp.max(dim=2, keepdim=True)
            else:
                top = lp.amax(dim=2, keepdim=True)
            lp.sub_(top).clamp_(min=_MIN_LOG_RATIO).exp_()
            total = lp.sum(dim=2)
            log_total = total.log()
            ll += torch.where(valid, top.squeeze(2) + log_total, 0.0).sum(dtype=torch.float64)
            if want == "assign":
                where = index[valid]
                assignments[where] = comp.gather(1, arg.squeeze(2))[valid]
                log_resp_max[where] = -log_total[valid].to(dtype)
            elif want == "stats":
                weight = torch.where(valid, total.reciprocal(), 0.0)
                if exact:  # moments about the components' means, directly
                    r = lp * weight[:, :, None]
                    rx, ry = r * dx, r * dy
                    products = [r, rx, ry, rx * dx, rx * dy, ry * dy]
                    moments += torch.stack([v.sum(dim=1) for v in products], dim=1).to(acc_dtype)
                else:  # moments about the cell centres
                    moments += torch.bmm(phi * weight[:, None, :], lp).to(acc_dtype)
        if want == "stats":
            moments = moments.transpose(1, 2).reshape(-1, 6)
            if not exact:
                moments = _recentre(moments, (padded.means[comp] - center[:, None, :]).reshape(-1, 2))
            stats.index_add_(0, comp.reshape(-1), moments)
    return _Sweep(float(ll), stats[:k] if stats is not None else None, assignments, log_resp_max)


class _Workspace:
    """Reusable flat buffers per dtype for a sweep's [g, P, M] log-densities and features."""

    def __init__(self, work_size: int, features_size: int, device: torch.device) -> None:
        self.sizes, self.device = (work_size, features_size), device
        self.buffers: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def _get(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if dtype not in self.buffers:
            self.buffers[dtype] = tuple(torch.empty(size, dtype=dtype, device=self.device) for size in self.sizes)
        return self.buffers[dtype]

    def work(self, dtype: torch.dtype, shape: tuple[int, int, int]) -> Tensor:
        return self._get(dtype)[0][: math.prod(shape)].view(shape)

    def features(self, dtype: torch.dtype, shape: tuple[int, int, int]) -> Tensor:
        return self._get(dtype)[1][: math.prod(shape)].view(shape)


def _blocks(
    counts: list[int], n_candidates: list[int], budget: int, max_points: int
) -> Iterator[tuple[list[int], int, int]]:
    """Blocks of non-empty cells: (cell ids, most points in a cell P, most candidates M).

    Neighbouring cells are added while g * P * M stays within ``budget`` and g * P within
    ``max_points``; a single cell over budget is swept in slices of its points.
    """
    cells = [c for c, count in enumerate(counts) if count > 0]
    i = 0
    while i < len(cells):
        j, rows, width = i, 0, 1
        while j < len(cells):
            more_rows, more_width = max(rows, counts[cells[j]]), max(width, n_candidates[cells[j]])
            g = j - i + 1
            if j > i and (g * more_rows * more_width > budget or g * more_rows > max_points):
                break
            rows, width, j = more_rows, more_width, j + 1
        yield cells[i:j], rows, width
        i = j


def _recentre(raw: Tensor, shift: Tensor) -> Tensor:
    """Moments [m, 6] about a point turned into moments about that point + ``shift`` [m, 2]."""
    s0, sx, sy, sxx, sxy, syy = raw.unbind(1)
    hx, hy = shift[:, 0].to(raw.dtype), shift[:, 1].to(raw.dtype)
    return torch.stack(
        [
            s0,
            sx - hx * s0,
            sy - hy * s0,
            sxx - 2.0 * hx * sx + hx * hx * s0,
            sxy - hx * sy - hy * sx + hx * hy * s0,
            syy - 2.0 * hy * sy + hy * hy * s0,
        ],
        dim=1,
    )


def _log_tol(dtype: torch.dtype) -> float:
    return 23.0 if dtype == torch.float32 else 37.0


class _Data:
    """Standardised points, and a copy sorted by the cells of a fine grid for full sweeps."""

    def __init__(
        self,
        points: Tensor,
        compute_dtype: torch.dtype,
        generator: torch.Generator,
        shards: _Shards | None = None,
        keep_unsorted: bool = True,
    ) -> None:
        self.points = points.detach()
        self.shards = _Shards(points.shape[0], False) if shards is None else shards
        self.frame = self.shards.frame(points)
        u = self.frame.points(points, compute_dtype)  # [2, N]
        sub = self.shards.subsample(u, _INIT_SUBSAMPLE, generator)
        self.grid = _Grid.build(u, _grid_size(u.shape[1]), sub)
        self.order, self.cells = self.grid.sort(u)
        self.u_sorted = u.index_select(1, self.order)
        # The unsorted copy serves fitting (initialisation, stepwise batches); a one-off
        # sweep (assigning or scoring millions of points) lets it go.
        self.u = u if keep_unsorted else None

    def exact(self, index: Tensor) -> Tensor:
        """[2, ...] float64 standardised points number ``index`` (of the input, unsorted)."""
        return self.frame.points(self.points[index], torch.float64)

    def sweep(self, table: _Table, want: str, max_points: int, acc_dtype: torch.dtype) -> _Sweep:
        """An E step over the points; log-likelihood and statistics summed over all ranks."""
        sweep = _sweep(
            self.u_sorted,
            self.cells,
            self.grid,
            table,
            want=want,
            max_points=max_points,
            acc_dtype=acc_dtype,
            exact_points=lambda index: self.exact(self.order[index]),
        )
        return _summed(sweep, self.shards, self.u_sorted.device)


def _summed(sweep: _Sweep, shards: _Shards, device: torch.device) -> _Sweep:
    """``sweep``'s log-likelihood and statistics summed over all ranks (one all-reduce)."""
    if not shards.distributed:
        return sweep
    if sweep.assignments is not None:
        raise ValueError("assignments are per point; a sharded sweep sums only log-likelihoods and statistics")
    flat = torch.tensor([sweep.log_likelihood], dtype=torch.float64, device=device)
    if sweep.stats is not None:
        flat = torch.cat([flat, sweep.stats.to(torch.float64).reshape(-1)])
    flat = shards.sum(flat)
    stats = flat[1:].reshape(-1, 6).to(sweep.stats.dtype) if sweep.stats is not None else None
    return sweep._replace(log_likelihood=float(flat[0]), stats=stats)


# ---------------------------------------------------------------------------------------
# M steps


def _covs(sxx: Tensor, sxy: Tensor, syy: Tensor) -> Tensor:
    return torch.stack([torch.stack([sxx, sxy], -1), torch.stack([sxy, syy], -1)], -2)


def _m_step(stats: Tensor, means: Tensor, covs: Tensor, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means and covariances from statistics [K, 6] centred at the current ``means``.

    A component with (almost) no responsibility is dropped: weight 0, mean and covariance
    kept, so it stays finite and invertible and is never a candidate again. A covariance
    that rounding made non-positive-definite (only possible when ``reg_covar`` is below
    the rounding of the statistics) keeps its previous value.
    """
    stats = stats.double()
    n = stats[:, 0]
    alive = n > _DEAD_COUNT
    safe_n = torch.where(alive, n, torch.ones_like(n))
    d = stats[:, 1:3] / safe_n[:, None]
    new_means = means + d
    sxx = stats[:, 3] / safe_n - d[:, 0] ** 2 + reg
    sxy = stats[:, 4] / safe_n - d[:, 0] * d[:, 1]
    syy = stats[:, 5] / safe_n - d[:, 1] ** 2 + reg
    ok = alive & (sxx > 0) & (syy > 0) & (sxx * syy - sxy * sxy > 0)
    new_covs = torch.where(ok[:, None, None], _covs(sxx, sxy, syy), covs)
    new_means = torch.where(alive[:, None], new_means, means)
    counts = torch.where(alive, n, torch.zeros_like(n))
    return counts / counts.sum(), new_means, new_covs


@dataclass
class _Running:
    """Stepwise-EM statistics as pooled moments: count (in points), mean, scatter/count.

    Stored as moments rather than raw sums so that blending batches taken about different
    reference means stays free of cancellation (Chan et al.'s pairwise update).
    """

    count: Tensor  # [K]
    mean: Tensor  # [K, 2]
    cov: Tensor  # [K, 2, 2], without reg_covar

    def blend(self, stats: Tensor, ref: Tensor, eta: float, scale: float) -> None:
        """``s <- (1 - eta) s + eta * scale * s_batch`` on the underlying sums."""
        stats = stats.double()
        n_b = stats[:, 0]
        has = n_b > 0
        safe = torch.where(has, n_b, torch.ones_like(n_b))
        d = stats[:, 1:3] / safe[:, None]
        mean_b = ref + d
        cov_b = _covs(
            stats[:, 3] / safe - d[:, 0] ** 2, stats[:, 4] / safe - d[:, 0] * d[:, 1], stats[:, 5] / safe - d[:, 1] ** 2
        )
        w1 = (1.0 - eta) * self.count
        w2 = torch.where(has, eta * scale * n_b, torch.zeros_like(n_b))
        total = w1 + w2
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        f1, f2 = (w1 / safe_total)[:, None], (w2 / safe_total)[:, None]
        mean = f1 * self.mean + f2 * torch.where(has[:, None], mean_b, self.mean)
        e1, e2 = self.mean - mean, torch.where(has[:, None], mean_b, self.mean) - mean
        cov = f1[..., None] * (self.cov + e1[:, :, None] * e1[:, None, :]) + f2[..., None] * (
            torch.where(has[:, None, None], cov_b, self.cov) + e2[:, :, None] * e2[:, None, :]
        )
        self.count, self.mean, self.cov = total, mean, cov

    def params(self, covs: Tensor, reg: float) -> tuple[Tensor, Tensor, Tensor]:
        alive = self.count > _DEAD_COUNT
        eye = torch.eye(2, dtype=self.cov.dtype, device=self.cov.device)
        new_covs = self.cov + reg * eye
        det = new_covs[:, 0, 0] * new_covs[:, 1, 1] - new_covs[:, 0, 1] * new_covs[:, 1, 0]
        ok = alive & (new_covs[:, 0, 0] > 0) & (det > 0)
        counts = torch.where(alive, self.count, torch.zeros_like(self.count))
        return counts / counts.sum(), self.mean, torch.where(ok[:, None, None], new_covs, covs)


# ---------------------------------------------------------------------------------------
# Initialisation


def _subsample_index(n: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """[min(n, size)] distinct indices in random order (so any prefix is a random sample too)."""
    return torch.randperm(n, generator=generator)[:size].to(device)


def _nearest(x: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Index [S] of each point's nearest center and the squared distance [S].

    ``|c|^2 - 2 x.c`` as one float32 product per block (a k-means initialisation need not
    be exact); points [S, 2] and centers [K, 2] are standardised, float64.
    """
    f = torch.float32
    xf, cf = x.to(f), centers.to(f)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=f, device=x.device)
    c2 = (cf * cf).sum(1)
    step = max(1, 2**22 // centers.shape[0])
    for start in range(0, x.shape[0], step):
        xs = xf[start : start + step]
        best, arg = torch.addmm(c2, xs, cf.t(), alpha=-2.0).min(dim=1)
        labels[start : start + step] = arg
        dist[start : start + step] = (best + (xs * xs).sum(1)).clamp_(min=0.0)
    return labels, dist


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): [k, 2] centers drawn from x [S, 2].

    K sequential draws, each O(S); buffers are reused so a draw is a handful of passes.
    """
    s = x.shape[0]
    x0, x1 = x[:, 0].contiguous(), x[:, 1].contiguous()
    draws = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    first = torch.randint(s, (1,), generator=generator).to(x.device)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = first[0]
    d2 = (x0 - x0[first]) ** 2 + (x1 - x1[first]) ** 2
    cum, t0, t1 = torch.empty_like(d2), torch.empty_like(d2), torch.empty_like(d2)
    for i in range(1, k):
        torch.cumsum(d2, 0, out=cum)
        j = torch.searchsorted(cum, (draws[i] * cum[-1]).reshape(1)).clamp_(max=s - 1)
        chosen[i] = j[0]
        torch.sub(x0, x0[j], out=t0).mul_(t0)
        torch.sub(x1, x1[j], out=t1)
        torch.minimum(d2, t0.addcmul_(t1, t1), out=d2)
    return x[chosen]


def _initialise(
    u: Tensor, k: int, init: str, reg: float, generator: torch.Generator, shards: _Shards
) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means, covariances (float64, standardised) from k-means on a subsample.

    Seeds by k-means++ on max(32k, K) of the points (or ``k`` random points), runs a few
    Lloyd iterations on max(100k, 2K) points, relocating empty clusters to the points farthest from their centers,
    then takes each cluster's share, mean and covariance. Covariances are shrunk towards
    the pooled within-cluster covariance with one pseudo-point, so a cluster of one or
    two points does not start as a spike.
    """
    size = max(_INIT_SUBSAMPLE, 2 * k)
    x = shards.subsample(u, size, generator).t().double()
    s = x.shape[0]
    if init == "kmeans++":
        seeding = x[: max(k, _SEEDING_SUBSAMPLE)]  # x is already a random subsample
        centers = _kmeans_plus_plus(seeding, k, generator)
    else:
        centers = x[torch.randperm(s, generator=generator)[:k].to(x.device)]
    labels = None
    for _ in range(_LLOYD_ITERATIONS):
        new_labels, dist = _nearest(x, centers)
        counts = torch.bincount(new_labels, minlength=k)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel() > 0:
            far = dist.topk(empty.numel()).indices
            new_labels[far] = empty
            counts = torch.bincount(new_labels, minlength=k)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centers = torch.zeros_like(centers).index_add_(0, labels, x) / counts.clamp(min=1)[:, None].to(x.dtype)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    means = torch.zeros(k, 2, dtype=x.dtype, device=x.device).index_add_(0, labels, x) / counts.clamp(min=1)[:, None]
    d = x - means[labels]
    outer = torch.stack([d[:, 0] * d[:, 0], d[:, 0] * d[:, 1], d[:, 1] * d[:, 1]], 1)
    scatter = torch.zeros(k, 3, dtype=x.dtype, device=x.device).index_add_(0, labels, outer)
    pooled = scatter.sum(0) / s
    shrunk = (scatter + pooled) / (counts + 1.0)[:, None]
    covs = _covs(shrunk[:, 0] + reg, shrunk[:, 1], shrunk[:, 2] + reg)
    weights = counts.clamp(min=0.5)
    return weights / weights.sum(), means, covs


# ---------------------------------------------------------------------------------------
# Public API


def fit_gmm_2d(
    points: Tensor,
    num_components: int,
    *,
    batch_size: int = 65536,
    max_epochs: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    init: str = "kmeans++",
    reg_covar: float = 1e-6,
    mode: str = "epoch",
    dtype: torch.dtype = torch.float64,
    compute_dtype: torch.dtype = torch.float32,
    log_every: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    distributed: bool = False,
) -> GMMResult:
    """Fit a K-component full-covariance Gaussian mixture to 2D points by mini-batch EM.

    This is Eq. 3 of the paper, maximising sum_i log sum_k w_k N(x_i | m_k, S_k) over
    the (mu, sigma) points of the inlier weights. Points go through in mini-batches so
    that millions of points and thousands of components fit in memory:

    - ``mode="epoch"`` (default): each epoch sweeps all points once, summing the
      sufficient statistics of every mini-batch, then takes one M step. That is exact EM,
      so the log-likelihood never decreases (up to the compute dtype's rounding).
    - ``mode="stepwise"``: stepwise (online) EM (Cappe & Moulines 2009): after each random
      mini-batch, ``s <- (1 - eta) s + eta s_batch`` with ``eta_t = (t + 2)^-0.6`` over
      mini-batches t, then an M step. More progress per sweep early on, on huge N; the
      history is a running estimate and need not increase.

    Each E step skips the (point, component) pairs that a bound over grid cells proves
    negligible (below 1e-10 of the point's density in float32), so its cost is N times
    tens of components, not N x K; see the module docstring.

    Initialisation is k-means++ seeding on max(32k, K) points (or ``init="random"``
    points) plus a few Lloyd iterations on a seeded subsample of max(100k, 2K) points;
    weights, means and covariances come from the clusters.
    A component whose expected count drops below 1e-6 points is dropped (weight 0, its
    last mean and covariance kept), which keeps EM monotone and the K indices stable;
    downstream, the paper's cluster-size reduction removes small clusters anyway.
    Regularisation: ``reg_covar`` times the variance of each coordinate is added to each
    covariance's diagonal, so the sigma-coordinate (values ~1e-3, variances ~1e-7) gets
    a floor relative to its own spread rather than one that swamps it.

    Args:
        points: [N, 2] points (mu, sigma), float32 or float64, any device; N >= K.
        num_components: K >= 1.
        batch_size: mini-batch size (the stepwise update size; in epoch mode only a cap
            on the points handled at once). Capped at ``2**26 // K`` so that a batch's
            point-by-component work stays under 64M elements even without pruning; sweeps
            are further cut into cache-sized blocks.
        max_epochs: epochs at most (>= 0; 0 returns the initialisation).
        tol: stop when the mean log-likelihood changes by less than this (nats per
            point, unit-free) between epochs; 1e-3 is scikit-learn's default.
        seed: seeds the subsample, the k-means++ draws and the stepwise batch order.
        init: "kmeans++" or "random".
        reg_covar: > 0, relative diagonal regulariser (see above).
        mode: "epoch" or "stepwise".
        dtype: float dtype of the accumulated statistics and of the returned parameters.
        compute_dtype: float dtype of the per-(point, component) arrays. float32 (default)
            puts ~1e-7 relative noise on the log-likelihood; float64 is ~2x slower and makes
            the epoch-mode history monotone to ~1e-12.
        log_every: log the log-likelihood at INFO level every this many epochs.
        callback: called as ``callback(epoch, mean_log_likelihood)`` after each epoch.
        distributed: in a data-parallel run (:mod:`pyro_gbnn.distributed`), ``points`` is
            this rank's shard, the shards in rank order make up the data, and every rank
            must call this with the same other arguments. The E steps' log-likelihoods and
            sufficient statistics are summed over ranks and the subsamples of the
            initialisation are drawn from all points, so every rank returns the mixture a
            single process fits to the concatenated points, up to the order of summation.
            Ignored in a single process.

    Returns:
        A :class:`GMMResult` in the units of ``points``, on their device.
    """
    _check_points(points)
    shards = _Shards(points.shape[0], distributed)
    n = shards.total
    k = _check_positive_int(num_components, "num_components")
    if k > n:
        raise UsageError(f"num_components must be <= the number of points N={n}, got {k}")
    batch_size = _check_positive_int(batch_size, "batch_size")
    max_epochs = _check_positive_int(max_epochs, "max_epochs", minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise UsageError(f"tol must be a number >= 0, got {tol!r}")
    if not isinstance(reg_covar, (int, float)) or not (reg_covar > 0 and math.isfinite(reg_covar)):
        raise UsageError(f"reg_covar must be a finite number > 0 (keeps covariances invertible), got {reg_covar!r}")
    if init not in _INITS:
        raise UsageError(f"init must be one of {list(_INITS)}, got {init!r}")
    if mode not in _MODES:
        raise UsageError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    dtype = _check_float_dtype(dtype, "dtype")
    compute_dtype = _check_float_dtype(compute_dtype, "compute_dtype")
    if log_every is not None:
        log_every = _check_positive_int(log_every, "log_every")
    batch_size = max(1, min(batch_size, 2**26 // k))
    reg = float(reg_covar)

    generator = torch.Generator().manual_seed(seed)
    data = _Data(points, compute_dtype, generator, shards)
    log_jac = data.frame.log_jacobian
    weights, means, covs = _initialise(data.u, k, init, reg, generator, shards)

    history: list[float] = []
    converged = False

    def record(epoch: int, value: float) -> None:
        history.append(value)
        if log_every is not None and epoch % log_every == 0:
            logger.info("gmm epoch %d: mean log-likelihood %.6f", epoch, value)
        if callback is not None:
            callback(epoch, value)

    if mode == "epoch":
        for epoch in range(max_epochs + 1):
            table = _table(weights, means, covs)
            want = "stats" if epoch < max_epochs else "ll"
            sweep = data.sweep(table, want, batch_size, dtype)
            record(epoch, sweep.log_likelihood / n + log_jac)
            if epoch > 0 and abs(history[-1] - history[-2]) < tol:
                converged = True
                break
            if epoch == max_epochs:
                break
            weights, means, covs = _m_step(sweep.stats, means, covs, reg)
        final = history[-1]
        n_iter = len(history) - 1
    else:
        running = _Running(weights * n, means.clone(), covs.clone())
        grid_sample = shards.subsample(data.u, _INIT_SUBSAMPLE, generator)
        grid = _Grid.build(data.u, _grid_size(min(n, batch_size), _BATCH_POINTS_PER_CELL), grid_sample)
        step = 0
        n_iter = 0
        for epoch in range(max_epochs):
            total = 0.0
            for batch in torch.randperm(n, generator=generator).to(points.device).split(batch_size):
                local = shards.local(batch)
                u_batch = data.u.index_select(1, local)
                order, cells = grid.sort(u_batch)
                sweep = _sweep(
                    u_batch.index_select(1, order),
                    cells,
                    grid,
                    _table(weights, means, covs),
                    want="stats",
                    max_points=batch_size,
                    acc_dtype=dtype,
                    exact_points=lambda index, at=local[order]: data.exact(at[index]),
                )
                sweep = _summed(sweep, shards, data.u.device)
                total += sweep.log_likelihood
                running.blend(sweep.stats, means, (step + 2.0) ** -_STEPWISE_POWER, n / batch.shape[0])
                weights, means, covs = running.params(covs, reg)
                step += 1
            n_iter = epoch + 1
            record(epoch, total / n + log_jac)
            if epoch > 0 and abs(history[-1] - history[-2]) < tol:
                converged = True
                break
        final = data.sweep(_table(weights, means, covs), "ll", batch_size, dtype).log_likelihood / n + log_jac

    out_means, out_covs = data.frame.from_unit(means.to(dtype), covs.to(dtype))
    return GMMResult(
        weights=weights.to(dtype),
        means=out_means,
        covs=out_covs,
        mean_log_likelihood=float(final),
        history=history,
        n_iter=n_iter,
        converged=converged,
    )


def _prepare(
    points: Tensor, weights: Tensor, means: Tensor, covs: Tensor, compute_dtype: torch.dtype
) -> tuple[_Data, _Table]:
    _check_points(points)
    _check_mixture(weights, means, covs)
    compute_dtype = _check_float_dtype(compute_dtype, "compute_dtype")
    data = _Data(points, compute_dtype, torch.Generator().manual_seed(0), keep_unsorted=False)
    dev = data.u_sorted.device
    m_u, c_u = data.frame.to_unit(means.detach().to(dev), covs.detach().to(dev))
    return data, _table(weights.detach().to(dev), m_u, c_u)


def gmm_log_likelihood(
    points: Tensor,
    weights: Tensor,
    means: Tensor,
    covs: Tensor,
    batch_size: int = 65536,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """Mean over points of log sum_k w_k N(x | m_k, S_k), in nats.

    Args:
        points: [N, 2]. weights: [K], >= 0, sum 1. means: [K, 2]. covs: [K, 2, 2],
            positive definite. batch_size: points per chunk (memory, not the result).
        compute_dtype: dtype of the per-(point, component) arrays; float32 is exact to
            ~1e-6 relative, float64 to ~1e-12.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    data, table = _prepare(points, weights, means, covs, compute_dtype)
    sweep = data.sweep(table, "ll", max(1, min(batch_size, 2**26 // weights.shape[0])), torch.float64)
    return sweep.log_likelihood / points.shape[0] + data.frame.log_jacobian


def gmm_assign(
    points: Tensor,
    weights: Tensor,
    means: Tensor,
    covs: Tensor,
    batch_size: int = 65536,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Most responsible (MAP) component of each point, for the weight-to-cluster index.

    Args: as :func:`gmm_log_likelihood`.

    Returns:
        assignments: [N] long, argmax_k of w_k N(x | m_k, S_k).
        log_resp_max: [N] log-responsibility of that component (<= 0; near 0 when the
            point clearly belongs to one component), in ``compute_dtype``.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    data, table = _prepare(points, weights, means, covs, compute_dtype)
    sweep = data.sweep(table, "assign", max(1, min(batch_size, 2**26 // weights.shape[0])), torch.float64)
    assignments = torch.empty_like(sweep.assignments)
    log_resp_max = torch.empty_like(sweep.log_resp_max)
    assignments[data.order] = sweep.assignments
    log_resp_max[data.order] = sweep.log_resp_max
    return assignments, log_resp_max
