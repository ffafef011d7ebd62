"""Posterior diagnostics with ArviZ: a guide's draws as ``InferenceData``, and how well the
variational posterior fits (Pareto k-hat of the importance ratios, PSIS-LOO).

Variational posteriors have no chains to mix, so r-hat and ESS say little here. What tells
whether q is a usable posterior is the distribution of the importance ratios
p(w, D) / q(w) over draws w ~ q: Pareto-smoothed importance sampling (Yao et al. 2018)
fits a generalised Pareto tail to them, and its shape k-hat reads as good (< 0.5), usable
(0.5-0.7) or poor (> 0.7). With the pointwise log-likelihood in the ``InferenceData``,
``az.loo`` gives PSIS-LOO, the expected log predictive density of held-out points.
Works on ArviZ 0.x and 1.x (see :mod:`pyro_gbnn.arviz_compat`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import nn

from pyro_gbnn.arviz_compat import from_groups, pareto_khat
from pyro_gbnn.errors import UsageError
from pyro_gbnn.predict import logits_for_draws, logits_under, module_device, with_batchnorm_statistics
from pyro_gbnn.reparameterization import _as_normal

__all__ = ["to_inference_data", "variational_khat", "khat_reading"]


@torch.no_grad()
def to_inference_data(
    guide: nn.Module | str | Path,
    num_samples: int = 200,
    sites: list[str] | None = None,
    max_weights_per_site: int | None = 20,
    seed: int | None = 0,
    *,
    bnn: nn.Module | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    batchnorm_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Any:
    """Draws of the guide's weights as ``InferenceData`` (ArviZ 1.x: a ``DataTree`` with the
    same groups) with one chain, named dims.

    ``posterior``: each site a variable [chain, draw, ``<site>_weight``] holding its first
    ``max_weights_per_site`` weights (flattened; None keeps all, which can be large); for a
    2DGBNN guide also ``component`` [chain, draw, component, coordinate], draws of the
    components' (mean, std) centres. With ``bnn`` and ``data = (x, y)`` (a test subset: the
    network runs once per draw on all of it): ``log_likelihood`` and
    ``posterior_predictive`` ``y`` [chain, draw, example], pointwise log p(y_n | w) and a
    label drawn from p(y | x_n, w), and ``observed_data`` ``y`` [example], from the same
    weight draws as the posterior; with ``batchnorm_batches`` (training batches) each draw
    predicts with its own BatchNorm statistics (``predict.batchnorm: per_draw``). Needs a
    guide with ``sample_weights(num_samples)``.

    ``guide`` may instead be a finished run's folder: its final model, with (unless ``data``
    is given) 1,000 test examples drawn at random under ``seed`` for the predictive groups.
    """
    if isinstance(guide, (str, Path)):
        guide, bnn, data = _run_model_and_data(guide, data, seed or 0)
    if not hasattr(guide, "sample_weights"):
        raise TypeError(f"{type(guide).__name__} has no sample_weights(num_samples); use a pyro_gbnn guide")
    if (bnn is None) != (data is None):
        raise UsageError("pass both bnn and data=(x, y) for the predictive groups, or neither")
    if seed is not None:
        torch.manual_seed(seed)
    draws = guide.sample_weights(num_samples)
    names = list(draws) if sites is None else sites
    unknown = [n for n in names if n not in draws]
    if unknown:
        raise KeyError(f"unknown sites {unknown}; the guide has {list(draws)[:10]}...")
    posterior, dims = {}, {}
    for name in names:
        flat = draws[name].reshape(num_samples, -1)
        if max_weights_per_site is not None:
            flat = flat[:, :max_weights_per_site]
        posterior[name] = flat.unsqueeze(0).cpu().numpy()
        dims[name] = [f"{name}_weight"]
    if hasattr(guide, "sample_components"):
        posterior["component"] = guide.sample_components(num_samples).unsqueeze(0).cpu().numpy()
        dims["component"] = ["component", "coordinate"]
    groups = {}
    if data is not None:
        groups = _predictive_groups(bnn, draws, *data, batchnorm_batches=batchnorm_batches)
        dims["y"] = ["example"]
    return from_groups({"posterior": posterior, **groups}, dims, {"coordinate": ["mu", "sigma"]})


def _run_model_and_data(run_dir: str | Path, data, seed: int) -> tuple[nn.Module, nn.Module, tuple]:
    from pyro_gbnn.data import sample_examples
    from pyro_gbnn.pipeline import load_run_model

    run, bnn, guide = load_run_model(run_dir)
    if guide is None:
        raise UsageError(f"the run in {str(run_dir)!r} is deterministic: it has no posterior to put into ArviZ")
    return guide, bnn, data if data is not None else sample_examples(run.data.test, 1000, seed)


def _predictive_groups(
    bnn: nn.Module,
    draws: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batchnorm_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    device = module_device(bnn)
    x, y = x.to(device), y.to(device)
    was_training = bnn.training
    bnn.eval()
    try:
        if batchnorm_batches is None:
            logits = logits_for_draws(bnn, x, draws)
        else:
            logits = logits_under(bnn, x, with_batchnorm_statistics(bnn, draws, batchnorm_batches))
    finally:
        bnn.train(was_training)
    num_samples = logits.shape[0]
    log_probs = logits.log_softmax(-1)
    pointwise = log_probs.gather(-1, y.view(1, -1, 1).expand(num_samples, -1, 1)).squeeze(-1)
    predicted = torch.distributions.Categorical(logits=logits).sample()
    return {
        "log_likelihood": {"y": pointwise.unsqueeze(0).cpu().numpy()},
        "posterior_predictive": {"y": predicted.unsqueeze(0).cpu().numpy()},
        "observed_data": {"y": y.cpu().numpy()},
    }


@torch.no_grad()
def variational_khat(
    bnn: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_samples: int = 500,
    seed: int | None = 0,
) -> tuple[float, np.ndarray]:
    """Pareto k-hat of the importance ratios p(w, D) / q(w), w ~ q; returns (k-hat, log ratios).

    p(w, D) = p(w) p(y | x, w) with the network's prior and likelihood; pass the training
    data (a subset is scaled to the full data set by the likelihood's plate, which makes
    the ratios an estimate). The guide's sites must have densities over the weights
    (Normal per weight: mean-field, the ``independent`` 2DGBNN semantics): the ``tied``
    guide's weights are functions of K shared draws and have none.
    """
    if num_samples < 25:
        raise UsageError(f"num_samples must be >= 25 to fit a Pareto tail (of at least 5 draws), got {num_samples}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    device = module_device(bnn, guide)
    x, y = x.to(device), y.to(device)
    was_training = bnn.training
    bnn.eval()
    log_ratios = []
    try:
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and _as_normal(site["fn"]) is None:
                    raise UsageError(
                        f"site {name!r} of {type(guide).__name__} has no density over its weights "
                        f"({type(site['fn']).__name__}); k-hat needs a guide with one (e.g. mean-field)"
                    )
            model_trace = poutine.trace(poutine.replay(bnn.model, trace=guide_trace)).get_trace(x, y)
            log_ratios.append(_log_density(model_trace) - _log_density(guide_trace))
    finally:
        bnn.train(was_training)
    ratios = np.asarray(log_ratios)
    return pareto_khat(ratios), ratios


def _log_density(trace) -> float:
    """Sum of a trace's (scaled) log-densities, accumulated in float64: summed in float32, a
    total near -1000 moves in steps of 1e-4 and nearly equal ratios tie, which leaves a
    Pareto tail nothing to fit."""
    trace.compute_log_prob()
    return float(sum(site["log_prob"].double().sum() for site in trace.nodes.values() if site["type"] == "sample"))


def khat_reading(khat: float) -> str:
    """How to read a Pareto k-hat (Vehtari et al.): good, usable or poor."""
    if np.isnan(khat):
        return "undefined"
    if khat < 0.5:
        return "good (< 0.5)"
    if khat <= 0.7:
        return "usable (0.5-0.7)"
    return "poor (> 0.7): q misses mass of the posterior"
