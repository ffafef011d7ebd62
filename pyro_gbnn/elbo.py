"""The ELBO as an ``nn.Module``: a plain torch optimizer loop trains it.

loss(x, y) = KL(q || p) - (N / B) * sum_batch log p(y | x, w),  w ~ q (one draw per particle)

The KL is taken in closed form site by site where torch knows it (Normal vs Normal) and
as a one-sample Monte-Carlo estimate log q(w) - log p(w) otherwise (e.g. the
scale-mixture prior). A guide that knows its KL better (a bound, a shared term)
provides ``kl_divergence(bnn)`` and is used instead. The data-set scaling happens once,
in the likelihood's plate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.reparameterization import record_weight_distributions

__all__ = ["AnalyticKL_ELBO", "ELBOTerms", "trace_kl"]


class ELBOTerms(NamedTuple):
    """One estimate of the ELBO's parts (all scaled to the full data set)."""

    expected_log_likelihood: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.kl - self.expected_log_likelihood


def trace_kl(model_trace, guide_trace) -> torch.Tensor:
    """Sum over latent model sites of KL(q || p), closed form where registered, else one sample."""
    total = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        q_site = guide_trace.nodes.get(name)
        if q_site is None:
            raise ValueError(f"the guide has no sample site {name!r}; every latent model site needs one")
        q, p = q_site["fn"], site["fn"]
        try:
            kl = kl_divergence(q, p).sum()
        except NotImplementedError:
            kl = q.log_prob(q_site["value"]).sum() - p.log_prob(site["value"]).sum()
        total = total + kl * site["scale"]
    return torch.as_tensor(total)


_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _guide_callable(guide: nn.Module):
    """``guide.forward`` where calling it directly changes nothing but the cost, else ``guide``.

    Calling a PyroModule activates its context, in which every access to a plain
    ``nn.Parameter`` or sub-module (a ``ParameterDict``) sends a "param" message per
    parameter through the effect handlers, for handlers that collect parameters; this
    ELBO does not, and on ResNet-20 the messages of a mean-field guide cost ~12 ms a step.
    Without the context the guide computes the same values, unless it has PyroSample
    attributes (which need the context to become traced sample sites) or hooks that the
    call would run: those guides are called as they are.
    """
    if not isinstance(guide, PyroModule):
        return guide
    if guide._forward_hooks or guide._forward_pre_hooks or guide._backward_hooks or guide._backward_pre_hooks:
        return guide
    if any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS):
        return guide
    if any(isinstance(m, PyroModule) and m._pyro_samples for m in guide.modules()):
        return guide
    return guide.forward


class AnalyticKL_ELBO(nn.Module):
    """Negative ELBO of ``bnn.model`` under ``guide``, with the KL in closed form where possible.

    Calling it returns the loss (to minimise); :meth:`terms` returns the parts. Model and
    guide run inside :func:`record_weight_distributions`, so layers configured for local
    reparameterization or flipout see the guide's Normals.
    """

    def __init__(self, bnn: BayesianNetwork, guide: nn.Module, num_particles: int = 1) -> None:
        super().__init__()
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.bnn = bnn
        self.guide = guide
        self.num_particles = num_particles

    def _particle(self, x: torch.Tensor, y: torch.Tensor) -> ELBOTerms:
        with record_weight_distributions():
            guide_trace = poutine.trace(_guide_callable(self.guide)).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(self.bnn.model, trace=guide_trace)).get_trace(x, y)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        log_likelihood = sum(
            site["log_prob_sum"]
            for site in model_trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        )
        guide_kl = getattr(self.guide, "kl_divergence", None)
        with torch.autocast(
            getattr(x, "device", torch.device("cpu")).type, enabled=False
        ):  # under mixed precision the KL stays fp32
            kl = guide_kl(self.bnn) if guide_kl is not None else trace_kl(model_trace, guide_trace)
        return ELBOTerms(log_likelihood, kl, model_trace.nodes["logits"]["value"])

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> ELBOTerms:
        parts = [self._particle(x, y) for _ in range(self.num_particles)]
        if len(parts) == 1:
            return parts[0]
        return ELBOTerms(
            torch.stack([p.expected_log_likelihood for p in parts]).mean(),
            torch.stack([p.kl for p in parts]).mean(),
            torch.stack([p.logits for p in parts]).mean(0),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.terms(x, y).loss
