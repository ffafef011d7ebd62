"""Priors over the weights of a Bayesian network.

A prior is one small class: subclass :class:`Prior` and implement
``prior_dist(name, module, param)``, returning a distribution whose event shape is the
parameter's shape. The converter in :mod:`pyro_gbnn.bayesian` calls it once per
parameter tensor, so a prior can depend on the layer (fan-in, kind) as well as the name.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

__all__ = [
    "Prior",
    "IIDNormalPrior",
    "LayerwiseNormalPrior",
    "ScaleMixturePrior",
    "fan_in_and_fan_out",
]


def fan_in_and_fan_out(module: nn.Module, param: torch.Tensor) -> tuple[int, int]:
    """Fan-in and fan-out of a parameter; a bias takes its layer's fan-in."""
    weight = getattr(module, "weight", None)
    shape = param.shape if param.dim() >= 2 else getattr(weight, "shape", param.shape)
    if len(shape) < 2:
        return int(shape[0]), int(shape[0])
    receptive = math.prod(shape[2:])
    return int(shape[1]) * receptive, int(shape[0]) * receptive


class Prior:
    """Maps each Bayesian parameter of a network to its prior distribution."""

    def prior_dist(self, name: str, module: nn.Module, param: torch.Tensor) -> dist.Distribution:
        """Prior of ``param`` (full name ``name``, owned by ``module``); event shape = param.shape."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement prior_dist(name, module, param) "
            "returning a distribution with event shape param.shape"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _normal(loc: float, scale: float, param: torch.Tensor) -> dist.Distribution:
    loc_t = torch.tensor(float(loc), dtype=param.dtype, device=param.device)
    scale_t = torch.tensor(float(scale), dtype=param.dtype, device=param.device)
    return dist.Normal(loc_t, scale_t).expand(param.shape).to_event(param.dim())


class IIDNormalPrior(Prior):
    """N(loc, scale^2) on every weight, the usual mean-field BNN prior."""

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"IIDNormalPrior scale must be > 0, got {scale}")
        self.loc = float(loc)
        self.scale = float(scale)

    def prior_dist(self, name, module, param):
        return _normal(self.loc, self.scale, param)


class LayerwiseNormalPrior(Prior):
    """Zero-mean Normal whose scale follows the layer's fan-in, so deep layers are not over-regularised.

    ``method``: ``"radford"`` (1/sqrt(fan_in)), ``"kaiming"`` (sqrt(2/fan_in)) or
    ``"xavier"`` (sqrt(2/(fan_in+fan_out))); the scale is multiplied by ``gain``.
    """

    METHODS = ("radford", "kaiming", "xavier")

    def __init__(self, method: str = "radford", gain: float = 1.0) -> None:
        if method not in self.METHODS:
            raise ValueError(f"LayerwiseNormalPrior method {method!r} is unknown; use one of {self.METHODS}")
        self.method = method
        self.gain = float(gain)

    def scale_for(self, module: nn.Module, param: torch.Tensor) -> float:
        fan_in, fan_out = fan_in_and_fan_out(module, param)
        if self.method == "radford":
            return self.gain / math.sqrt(fan_in)
        if self.method == "kaiming":
            return self.gain * math.sqrt(2.0 / fan_in)
        return self.gain * math.sqrt(2.0 / (fan_in + fan_out))

    def prior_dist(self, name, module, param):
        return _normal(0.0, self.scale_for(module, param), param)


class ScaleMixturePrior(Prior):
    """Blundell et al. (2015): pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) on every weight.

    A heavy spike near zero with a broad slab; it has no closed-form KL against a Normal,
    so the ELBO falls back to a one-sample Monte-Carlo estimate for these sites.
    """

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> None:
        if not 0.0 < pi < 1.0:
            raise ValueError(f"ScaleMixturePrior pi must be in (0, 1), got {pi}")
        if sigma1 <= 0 or sigma2 <= 0:
            raise ValueError(f"ScaleMixturePrior scales must be > 0, got {sigma1}, {sigma2}")
        self.pi = float(pi)
        self.sigma1 = float(sigma1)
        self.sigma2 = float(sigma2)

    def prior_dist(self, name, module, param):
        opts = {"dtype": param.dtype, "device": param.device}
        shape = param.shape + (2,)
        mixing = dist.Categorical(probs=torch.tensor([self.pi, 1.0 - self.pi], **opts).expand(shape))
        scales = torch.tensor([self.sigma1, self.sigma2], **opts).expand(shape)
        components = dist.Normal(torch.zeros((), **opts).expand(shape), scales)
        return dist.MixtureSameFamily(mixing, components).to_event(param.dim())
