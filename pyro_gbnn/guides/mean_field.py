"""Mean-field Normal guide: one independent Normal per weight, built eagerly from the network."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides.base import SiteGuide, site_key
from pyro_gbnn.priors import fan_in_and_fan_out

__all__ = ["MeanFieldGuide", "initial_scales", "inverse_softplus"]


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """rho with softplus(rho) = x, for x > 0: how scales are stored unconstrained."""
    return x + torch.log(-torch.expm1(-x))


def initial_scales(
    bnn: BayesianNetwork, init_scale: float | str = "xavier", gain: float = 0.01, bias_std: float = 1e-3
) -> dict[str, torch.Tensor]:
    """Small initial standard deviations, as in the paper's appendix I.4.

    ``"xavier"``: weights |U(-a, a)| with a = gain * sqrt(6 / (fan_in + fan_out)) (torch's
    Xavier-uniform bound), biases |N(0, bias_std^2)|; both floored at 1e-6 so that
    log-scales stay finite. A float gives every weight that scale. Drawn by the CPU's
    generator whatever the network's device (so a seed gives the same guide on a GPU),
    returned on the device of each weight.
    """
    scales = {}
    for name, shape in bnn.site_shapes.items():
        device = bnn.initial_values[name].device
        template = torch.empty(shape)
        if isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool):
            if init_scale <= 0:
                raise ValueError(f"init_scale must be > 0 or 'xavier', got {init_scale}")
            scales[name] = torch.full(shape, float(init_scale), device=device)
            continue
        if init_scale != "xavier":
            raise ValueError(f"init_scale must be a positive number or 'xavier', got {init_scale!r}")
        if len(shape) >= 2:
            fan_in, fan_out = fan_in_and_fan_out(bnn.module_of(name), template)
            bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
            values = template.uniform_(-bound, bound).abs_()
        else:
            values = template.normal_(0.0, bias_std).abs_()
        scales[name] = values.clamp_min_(1e-6).to(device)
    return scales


class MeanFieldGuide(SiteGuide):
    """q(w) = prod_i N(w_i | loc_i, scale_i^2), scale = softplus(rho).

    Parameters are plain ``nn.Parameter``s of this module (``loc/<site>``,
    ``rho/<site>``, with "." in site names written "/"), created at construction from the
    network's shapes, so an optimizer can be built and a checkpoint loaded before any
    data is seen. Means start at ``init_loc`` (default: the weights the network had when
    it was converted, e.g. a pretrained deterministic network).
    """

    def __init__(
        self,
        bnn: BayesianNetwork,
        init_loc: Mapping[str, torch.Tensor] | None = None,
        init_scale: float | str = "xavier",
        xavier_gain: float = 0.01,
    ) -> None:
        super().__init__(bnn)
        init_loc = bnn.initial_values if init_loc is None else init_loc
        missing = [n for n in bnn.site_shapes if n not in init_loc]
        if missing:
            raise ValueError(f"init_loc lacks sites {missing[:5]}; pass a mapping with every Bayesian parameter")
        scales = initial_scales(bnn, init_scale, xavier_gain)
        self.loc = nn.ParameterDict(
            {site_key(n): nn.Parameter(init_loc[n].detach().clone().reshape(s)) for n, s in self.site_shapes.items()}
        )
        self.rho = nn.ParameterDict({site_key(n): nn.Parameter(inverse_softplus(scales[n])) for n in self.site_shapes})

    def loc_parameters(self) -> Iterator[nn.Parameter]:
        """Means, which usually want a small learning rate (appendix I.4)."""
        return iter(self.loc.values())

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        """Unconstrained scales rho (scale = softplus(rho)), which want a larger one."""
        return iter(self.rho.values())

    def location(self, name: str) -> nn.Parameter:
        """The mean parameter of site ``name``."""
        return self.loc[site_key(name)]

    def scale(self, name: str) -> torch.Tensor:
        return F.softplus(self.rho[site_key(name)])

    def distribution(self, name: str) -> dist.Distribution:
        """q of site ``name``, event shape = the parameter's shape."""
        loc = self.loc[site_key(name)]
        return dist.Normal(loc, self.scale(name)).to_event(loc.dim())

    @torch.no_grad()
    def posterior_moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of every weight, detached: the points 2DGBNN clusters."""
        return {
            name: (self.loc[site_key(name)].detach().clone(), self.scale(name).detach()) for name in self.site_shapes
        }
