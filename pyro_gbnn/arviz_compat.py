"""The three ArviZ calls the diagnostics make, on both ArviZ lines.

ArviZ 0.x (the line Python 3.10-3.11 installs) builds ``InferenceData`` from keyword
groups and has ``az.psislw``; ArviZ 1.x (Python >= 3.12) builds an xarray ``DataTree``
from one dict of groups, keeps PSIS in ``arviz_stats`` (where ``psislw`` takes
log-likelihoods and smooths their negatives, 0.x's takes the log weights) and names the LOO fields
``elpd`` and ``p`` instead of ``elpd_loo`` and ``p_loo``. Both give groups with the same
names, dims and values, which is all the rest of the package reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import arviz as az
import numpy as np

__all__ = ["ARVIZ_1", "LooResult", "from_groups", "group_names", "pareto_khat", "loo"]

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1


class LooResult(NamedTuple):
    """PSIS-LOO: expected log predictive density, its standard error, the effective number
    of parameters, and the Pareto k-hat of each held-out point."""

    elpd: float
    se: float
    p: float
    pareto_k: np.ndarray


def from_groups(groups: dict[str, dict[str, np.ndarray]], dims: dict[str, list[str]], coords: dict[str, Any]) -> Any:
    """``InferenceData`` (0.x) or ``DataTree`` (1.x) of ``{group: {variable: array}}``;
    arrays of sampled groups are [chain, draw, ...]."""
    if ARVIZ_1:
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(**groups, dims=dims, coords=coords)


def group_names(data: Any) -> set[str]:
    """The groups of what :func:`from_groups` returned (``posterior``, ``log_likelihood``, ...)."""
    if ARVIZ_1:
        return {name.strip("/") for name in data.groups if name != "/"}
    return set(data.groups())


def pareto_khat(log_ratios: np.ndarray) -> float:
    """Pareto k-hat of the importance ratios exp(``log_ratios``) (PSIS, relative efficiency 1)."""
    shifted = np.asarray(log_ratios, dtype=np.float64)
    shifted = shifted - shifted.max()
    if ARVIZ_1:
        from arviz_stats.base import array_stats

        _, khat = array_stats.psislw(-shifted, r_eff=1)  # 1.x takes log-likelihoods: weights = -input
    else:
        _, khat = az.psislw(shifted)
    return float(khat)


def loo(data: Any) -> LooResult:
    """PSIS-LOO of data with a ``log_likelihood`` group (``az.loo(data, pointwise=True)``)."""
    result = az.loo(data, pointwise=True)
    if ARVIZ_1:
        return LooResult(float(result.elpd), float(result.se), float(result.p), np.asarray(result.pareto_k))
    return LooResult(float(result.elpd_loo), float(result.se), float(result.p_loo), np.asarray(result.pareto_k))
