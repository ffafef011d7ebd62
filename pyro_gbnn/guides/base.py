"""The guide protocol: one variational distribution per Bayesian weight site.

A new guide is one small class. Subclass :class:`SiteGuide`, create its parameters in
``__init__`` from ``bnn.site_shapes`` / ``bnn.initial_values`` (eagerly, so optimizers and
checkpoints work before any data is seen) and implement :meth:`SiteGuide.distribution`,
the q of one site. Everything else has a default that a guide may override:

* ``loc_parameters()`` / ``scale_parameters()``: the two learning-rate groups of the
  pipeline (appendix I.4 of the 2DGBNN paper: means slow, scales fast). By default every
  parameter trains at the location rate.
* ``kl_divergence(bnn)``: a closed-form (or bounded) KL(q || p) that the ELBO uses instead
  of the site-by-site KL; needed when q's sites are not independent or not densities.
* ``after_step(optimizer)``: non-gradient updates run after every optimizer step
  (closed-form coordinate updates, changes of the active set).
* ``sample_weights(num_samples)``: vectorised draws for prediction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.local_params import LocalParams

__all__ = [
    "BufferDict",
    "SiteGuide",
    "network_device",
    "normal_kl",
    "normal_prior",
    "optimizer_state",
    "site_key",
    "zero_optimizer_state",
]


def site_key(name: str) -> str:
    """A site name as an ``nn.ParameterDict`` key ("." is not allowed there)."""
    return name.replace(".", "/")


def network_device(bnn: BayesianNetwork) -> torch.device:
    """The device of ``bnn``'s weights, where a guide builds its parameters (CPU if it has none)."""
    return next((v.device for v in bnn.initial_values.values()), torch.device("cpu"))


def normal_prior(bnn: BayesianNetwork, name: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of site ``name``'s Normal prior, for guides whose KL is in closed form.

    A constant tensor comes back as a scalar (priors are usually expanded scalars), so
    guides can keep it as a buffer at no memory cost; ``guide`` names the caller in the error.
    """
    base = bnn.prior_distribution(name)
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if not isinstance(base, torch.distributions.Normal):
        raise ValueError(
            f"{guide} needs a Normal prior per weight; site {name!r} has {type(base).__name__} "
            "(use iid_normal or layerwise_normal)"
        )
    return _compact(base.loc), _compact(base.scale)


def normal_kl(
    loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(loc, scale^2) || N(prior_loc, prior_scale^2))."""
    return torch.log(prior_scale / scale) + (scale**2 + (loc - prior_loc) ** 2) / (2 * prior_scale**2) - 0.5


def optimizer_state(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The optimizer's running statistics of ``params`` (Adam's moments, SGD's momentum): every
    state tensor shaped like its parameter."""
    if optimizer is None:
        return []
    return [
        value
        for param in params
        for value in optimizer.state.get(param, {}).values()
        if torch.is_tensor(value) and value.shape == param.shape
    ]


def zero_optimizer_state(
    optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor], entries: torch.Tensor
) -> None:
    """Forget the optimizer's running statistics at the flat ``entries`` of each of ``params``,
    so an entry a guide rewrote or retired outside the gradient step restarts from rest."""
    for value in optimizer_state(optimizer, params):
        value.view(-1)[entries] = 0


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A scalar for a tensor that repeats one value (an expanded scalar is recognised by its
    strides, without reading values: no device synchronisation), else a contiguous copy."""
    t = t.detach()
    if t.numel() and all(stride == 0 for stride in t.stride()):
        return t[(0,) * t.dim()].clone()
    return t.reshape(-1)[0].clone() if t.numel() and bool((t == t.reshape(-1)[0]).all()) else t.clone().contiguous()


class BufferDict(nn.Module):
    """Named tensors (keys may contain "/") that move with ``.to()``; in ``state_dict`` when persistent."""

    def __init__(self, tensors: dict[str, torch.Tensor], persistent: bool = True) -> None:
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value, persistent=persistent)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]


class SiteGuide(LocalParams, PyroModule):
    """Base class of guides that give each Bayesian weight site its own distribution.

    ``forward`` samples every site of ``bnn`` from :meth:`distribution`, so the guide runs
    under :class:`~pyro_gbnn.elbo.AnalyticKL_ELBO`, Pyro's own ELBOs and ``predict``.
    """

    def __init__(self, bnn) -> None:
        super().__init__()
        self.site_shapes: OrderedDict[str, torch.Size] = OrderedDict(bnn.site_shapes)

    def distribution(self, name: str) -> dist.Distribution:
        """q of site ``name``; its event shape is the weight's shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement distribution(name) returning q of one site")

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: pyro.sample(name, self.distribution(name)) for name in self.site_shapes}

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` independent draws of every weight, shape [S, *param.shape]."""
        return {name: self.distribution(name).sample((num_samples,)) for name in self.site_shapes}

    def loc_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained at the location learning rate (default: all of them)."""
        scales = {id(p) for p in self.scale_parameters()}
        return (p for p in self.parameters() if id(p) not in scales)

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained at the scale learning rate (default: none)."""
        return iter(())
