"""Posterior diagnostics with ArviZ: draws from a guide as ``InferenceData``.

Variational posteriors have no chains to mix, so r-hat and ESS say little here; what
ArviZ gives is a common container and its summaries and plots (posterior densities,
forest plots of weight means and HDIs), the same tools used for MCMC posteriors.
"""

from __future__ import annotations

import arviz as az
import torch
from torch import nn

__all__ = ["to_inference_data"]


@torch.no_grad()
def to_inference_data(
    guide: nn.Module,
    num_samples: int = 200,
    sites: list[str] | None = None,
    max_weights_per_site: int | None = 20,
    seed: int | None = 0,
) -> az.InferenceData:
    """Draws of the guide's weights as ``InferenceData`` with one chain.

    Each site becomes a variable of shape [1, num_samples, n] holding its first
    ``max_weights_per_site`` weights (flattened; None keeps all, which can be large).
    Needs a guide with ``sample_weights(num_samples)`` (e.g. :class:`MeanFieldGuide`).
    """
    if not hasattr(guide, "sample_weights"):
        raise TypeError(f"{type(guide).__name__} has no sample_weights(num_samples); use a pyro_gbnn guide")
    if seed is not None:
        torch.manual_seed(seed)
    draws = guide.sample_weights(num_samples)
    names = list(draws) if sites is None else sites
    unknown = [n for n in names if n not in draws]
    if unknown:
        raise KeyError(f"unknown sites {unknown}; the guide has {list(draws)[:10]}...")
    posterior = {}
    for name in names:
        flat = draws[name].reshape(num_samples, -1)
        if max_weights_per_site is not None:
            flat = flat[:, :max_weights_per_site]
        posterior[name] = flat.unsqueeze(0).cpu().numpy()
    return az.from_dict(posterior=posterior)
